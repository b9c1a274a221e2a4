import json
import os
import re
import shlex
import sys
from dataclasses import asdict

import pytest

import grid
from engine import grid_jobs, grid_rows
from analysis import results
from engine.cli import run_cli
from engine.errors import ConfigError


class FakeTrainer:
    """Stands in for multitask_classifier.main: parses argv with the real trainer's parser
    (an option it does not know fails here as it would there), records it, and writes a
    finished run folder with the full configuration and scores that depend on the seed."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> str:
        self.calls.append(list(argv))
        cfg = grid.trainer_config(argv)
        os.makedirs(cfg.run_dir)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f)
        score = 0.5 + 0.01 * cfg.seed
        with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as f:
            for epoch in range(1, cfg.epochs + 1):
                f.write(json.dumps({"epoch": epoch, "dev": {"sst": score, "quora": score,
                                    "sts": score}, "overall": score, "grad": {}}) + "\n")
        with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
            json.dump({"epochs": cfg.epochs}, f)
        return cfg.run_dir


def refuse(argv):
    raise AssertionError(f"nothing should run, got {argv}")


def value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_two_configurations_run_then_resume(tmp_path, capsys):
    runs = str(tmp_path / "grid")
    argv = ["--rows", "pretrain-0.3", "finetune-mix + PCGrad (0.5)", "--runs_dir", runs,
            "--epochs", "2", "--data_dir", "D"]
    trainer = FakeTrainer()
    result = grid.main(argv, runner=trainer)
    assert [value(a, "--run_dir") for a in trainer.calls] == [
        os.path.join(runs, "pretrain-0.3-seed0"), os.path.join(runs, "finetune-mix-pcgrad-0.5-seed0")]
    printed = capsys.readouterr().out
    assert "[1/2] pretrain (dropout 0.3) seed 0 -> " in printed
    assert "[2/2] finetune-mix + PCGrad (0.5) seed 0 -> " in printed
    assert [row["name"] for row in result["rows"]] == ["pretrain (dropout 0.3)",
                                                       "finetune-mix + PCGrad (0.5)"]
    assert os.path.isfile(os.path.join(runs, "report", "table.md"))
    assert os.path.isfile(os.path.join(runs, "report", "methods.png"))

    grid.main(argv, runner=refuse)  # everything is finished: the runner must not be called
    assert capsys.readouterr().out.count("done, skipping") == 2


def test_interrupted_run_is_rerun_from_scratch(tmp_path, capsys):
    runs = str(tmp_path / "grid")
    argv = ["--rows", "finetune-seq-0.3", "finetune-mix-0.3", "--runs_dir", runs, "--epochs", "1"]
    grid.main(argv, runner=FakeTrainer())
    interrupted = os.path.join(runs, "finetune-mix-0.3-seed0")
    os.remove(os.path.join(interrupted, "summary.json"))
    with open(os.path.join(interrupted, "stale.txt"), "w") as f:
        f.write("left by the killed run")
    trainer = FakeTrainer()
    grid.main(argv, runner=trainer)
    assert [value(a, "--run_dir") for a in trainer.calls] == [interrupted]
    assert not os.path.exists(os.path.join(interrupted, "stale.txt"))
    assert os.path.isfile(os.path.join(interrupted, "summary.json"))
    assert "stopped before its first save" in capsys.readouterr().out


def test_interrupted_run_with_a_saved_state_is_resumed(tmp_path, capsys):
    runs = str(tmp_path / "grid")
    argv = ["--rows", "finetune-mix-0.3", "--runs_dir", runs, "--epochs", "1"]
    grid.main(argv, runner=FakeTrainer())
    interrupted = os.path.join(runs, "finetune-mix-0.3-seed0")
    os.remove(os.path.join(interrupted, "summary.json"))
    open(os.path.join(interrupted, "last.pt"), "wb").close()
    calls = []

    def resume(call):
        calls.append(call)
        os.remove(os.path.join(interrupted, "last.pt"))
        with open(os.path.join(interrupted, "summary.json"), "w") as f:
            json.dump({"epochs": 1}, f)
        return interrupted
    grid.main(argv, runner=resume)
    assert calls == [["--resume", interrupted]]
    assert "resuming from its last.pt" in capsys.readouterr().out
    open(os.path.join(interrupted, "last.pt"), "wb").close()
    os.remove(os.path.join(interrupted, "summary.json"))
    with pytest.raises(ConfigError, match="epochs: 1 there, 2 now"):  # never resumed as another run
        grid.main(argv[:-1] + ["2"], runner=refuse)


def test_argv_of_every_table1_row(tmp_path):
    runs = str(tmp_path / "grid")
    trainer = FakeTrainer()
    grid.main(["--runs_dir", runs, "--epochs", "1", "--subsample", "50", "--data_dir", "D",
               "--checkpoint", "C", "--finetune_lr", "5e-5", "--pretrain_lr", "0.001",
               "--extra=--batch_size_quora 4"], runner=trainer)
    by_slug = {os.path.basename(value(a, "--run_dir")): a for a in trainer.calls}
    assert list(by_slug) == [
        "pretrain-0.3-seed0", "finetune-seq-0.3-seed0", "finetune-mix-0.3-seed0",
        "finetune-mix-0.5-seed0", "finetune-mix-pcgrad-0.3-seed0", "finetune-mix-pcgrad-0.5-seed0",
        "finetune-mix-aux-0.3-seed0", "finetune-mix-aux-0.5-seed0"]
    aux_file = os.path.join("D", "yelp-aux-train.csv")
    expected = {  # slug: (option, mode, pcgrad, aux, dropout)
        "pretrain-0.3-seed0": ("pretrain", "mix", False, None, "0.3"),
        "finetune-seq-0.3-seed0": ("finetune", "seq", False, None, "0.3"),
        "finetune-mix-0.5-seed0": ("finetune", "mix", False, None, "0.5"),
        "finetune-mix-pcgrad-0.3-seed0": ("finetune", "mix", True, None, "0.3"),
        "finetune-mix-aux-0.5-seed0": ("finetune", "mix", False, aux_file, "0.5")}
    for slug, (option, mode, pcgrad, aux, dropout) in expected.items():
        argv = by_slug[slug]
        assert (value(argv, "--option"), value(argv, "--mode")) == (option, mode)
        assert ("--pcgrad" in argv) == pcgrad
        assert value(argv, "--aux") == aux
        assert value(argv, "--hidden_dropout_prob") == dropout
        assert (value(argv, "--seed"), value(argv, "--epochs")) == ("0", "1")
        assert (value(argv, "--subsample"), value(argv, "--data_dir")) == ("50", "D")
        assert value(argv, "--checkpoint") == "C"
        assert float(value(argv, "--lr")) == (1e-3 if option == "pretrain" else 5e-5)
        assert argv[-2:] == ["--batch_size_quora", "4"]


def test_seeds_run_outermost_and_defaults_leave_flags_out(tmp_path, monkeypatch):
    monkeypatch.setenv("MINBERT_DATA_DIR", "ENVDATA")
    runs = str(tmp_path / "grid")
    trainer = FakeTrainer()
    grid.main(["--rows", "finetune-mix-aux-0.3,pretrain-0.3", "--seeds", "1", "2",
               "--runs_dir", runs, "--epochs", "1"], runner=trainer)
    names = [os.path.basename(value(a, "--run_dir")) for a in trainer.calls]
    assert names == ["pretrain-0.3-seed1", "finetune-mix-aux-0.3-seed1",
                     "pretrain-0.3-seed2", "finetune-mix-aux-0.3-seed2"]
    first, aux_run = trainer.calls[0], trainer.calls[1]
    assert "--subsample" not in first and "--checkpoint" not in first and "--lr" not in first
    assert "--subsample_fraction" not in first
    assert value(first, "--data_dir") == "ENVDATA"
    assert value(aux_run, "--aux") == os.path.join("ENVDATA", "yelp-aux-train.csv")


def test_a_subsample_fraction_goes_to_every_run_and_excludes_a_cap(tmp_path):
    trainer = FakeTrainer()
    base = ["--rows", "finetune-mix-0.3", "--runs_dir", str(tmp_path / "grid"), "--epochs", "1"]
    grid.main(base + ["--subsample_fraction", "0.25"], runner=trainer)
    (argv,) = trainer.calls
    assert value(argv, "--subsample_fraction") == "0.25" and "--subsample" not in argv
    for bad in (["--subsample_fraction", "1"], ["--subsample_fraction", "0.5", "--subsample", "9"]):
        with pytest.raises(ConfigError, match="--subsample_fraction must be in"):
            grid.main(base + bad, runner=refuse)
    with pytest.raises(ConfigError, match="--subsample_fraction"):  # grid sets it, not --extra
        grid.main(base + ["--extra=--subsample_fraction 0.5"], runner=refuse)


def test_finished_run_with_other_settings_is_an_error(tmp_path):
    runs = str(tmp_path / "grid")
    grid.main(["--rows", "pretrain-0.3", "--runs_dir", runs, "--epochs", "1"], runner=FakeTrainer())
    base = ["--rows", "pretrain-0.3", "--runs_dir", runs, "--epochs", "1"]
    with pytest.raises(ConfigError, match="epochs: 1 there, 3 now"):
        grid.main(base + ["--epochs", "3"], runner=refuse)
    with pytest.raises(ConfigError, match="subsample"):
        grid.main(base + ["--subsample", "100"], runner=refuse)
    # Not only the row, seed and budget: every setting of the run counts.
    for extra, what in ((["--pretrain_lr", "0.01"], "lr: 0.001 there, 0.01 now"),
                        (["--extra=--head_lr 0.5"], "head_lr"),
                        (["--extra=--weight_decay 0.1"], "weight_decay: 0.0 there, 0.1 now"),
                        (["--data_dir", "elsewhere"], "data_dir"),
                        (["--checkpoint", "other"], "checkpoint: '' there, '/\\S*/other' now")):
        with pytest.raises(ConfigError, match=what):
            grid.main(base + extra, runner=refuse)
    grid.main(base + ["--extra=--no-progress"], runner=refuse)  # harmless: reused


def test_a_run_that_saved_its_paths_relative_is_still_the_same_run(tmp_path, monkeypatch):
    """config.json stores --data_dir and --checkpoint resolved; one written before, relative,
    still counts as the run of the same (relative) flags given in the same folder."""
    monkeypatch.chdir(tmp_path)
    base = ["--rows", "pretrain-0.3", "--runs_dir", "grid", "--epochs", "1", "--data_dir", "D",
            "--checkpoint", "C"]
    grid.main(base, runner=FakeTrainer())
    path = os.path.join("grid", "pretrain-0.3-seed0", "config.json")
    saved = json.load(open(path))
    assert saved["data_dir"] == str(tmp_path / "D")
    with open(path, "w") as f:
        json.dump({**saved, "data_dir": "D", "checkpoint": "C"}, f)
    grid.main(base, runner=refuse)


def test_unknown_row_lists_the_known_ones():
    rows = grid_rows.table1_rows("aux.csv")
    with pytest.raises(ConfigError, match="finetune-mix-pcgrad-0.3"):
        grid_rows.select_rows(rows, "finetune-mix-0.7")
    assert [results.config_slug(r) for r in grid_rows.select_rows(rows, "all")][:2] == [
        "pretrain-0.3", "finetune-seq-0.3"]
    assert len(grid_rows.select_rows(rows, "pretrain-0.3 finetune-seq-0.3")) == 2


# --- --print_commands and --jobs ---------------------------------------------------------

FAKE_SCRIPT = r'''
"""A fast stand-in for multitask_classifier.py: writes a finished run folder from argv."""
import json, os, sys
argv = sys.argv[1:]
cfg, i = {}, 0
while i < len(argv):
    key = argv[i][2:]
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        value = argv[i + 1]
        try:
            value = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            pass
        cfg[key], i = value, i + 2
    else:
        cfg[key], i = True, i + 1
print("fake trainer", " ".join(argv))
if cfg.get("pcgrad") and os.environ.get("FAKE_FAIL_PCGRAD"):
    print("boom: pcgrad failed", file=sys.stderr)
    sys.exit(3)
os.makedirs(cfg["run_dir"])
with open(os.path.join(cfg["run_dir"], "config.json"), "w") as f:
    json.dump(dict(cfg, pcgrad=bool(cfg.get("pcgrad")), aux=""), f)
with open(os.path.join(cfg["run_dir"], "env.json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "CUDA_VISIBLE_DEVICES")}, f)
score = 0.5 + 0.01 * cfg["seed"]
with open(os.path.join(cfg["run_dir"], "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"epoch": 1, "dev": {"sst": score, "quora": score, "sts": score},
                        "overall": score}) + "\n")
with open(os.path.join(cfg["run_dir"], "summary.json"), "w") as f:
    json.dump({"epochs": 1}, f)
'''


@pytest.fixture
def fake_script(tmp_path, monkeypatch):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_SCRIPT)
    monkeypatch.setattr(grid_jobs, "TRAINER", str(path))
    monkeypatch.setattr(grid_jobs, "POLL_SECONDS", 0.05)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever the machine has
    monkeypatch.setattr(grid_jobs, "cpu_count", lambda: 8)
    return str(path)


def test_print_commands_parse_back_to_the_runs_still_to_do(tmp_path, capsys):
    runs = str(tmp_path / "my runs")  # a space: the commands must quote it
    base = ["--rows", "pretrain-0.3", "finetune-mix-0.3", "--seeds", "0", "1", "--runs_dir", runs,
            "--epochs", "1", "--data_dir", "D", "--extra=--head_lr 1e-3 --quora_encoding 'bi'"]
    grid.main(base + ["--print_commands"], runner=refuse)
    lines = capsys.readouterr().out.splitlines()
    opts = grid.parse_options(base)
    rows = grid_rows.grid_rows(opts.rows, "")
    expected = [[sys.executable, grid_jobs.TRAINER] + grid.trainer_argv(
        row, seed, os.path.join(runs, f"{results.config_slug(row)}-seed{seed}"), opts)
        for seed in (0, 1) for row in rows]
    assert [shlex.split(line) for line in lines] == expected
    assert expected[0][-4:] == ["--head_lr", "1e-3", "--quora_encoding", "bi"]
    assert not os.path.exists(runs)  # nothing ran

    grid.main(base[:5] + ["0"] + base[6:], runner=FakeTrainer())  # seed 0 of both rows
    interrupted = os.path.join(runs, "finetune-mix-0.3-seed0")
    os.remove(os.path.join(interrupted, "summary.json"))
    open(os.path.join(interrupted, "last.pt"), "wb").close()
    capsys.readouterr()
    grid.main(base + ["--print_commands"], runner=refuse)
    captured = capsys.readouterr()
    assert [shlex.split(line) for line in captured.out.splitlines()] == [
        [sys.executable, grid_jobs.TRAINER, "--resume", interrupted], expected[2], expected[3]]
    assert "pretrain (dropout 0.3) seed 0: done, skipping" in captured.err


def test_jobs_run_rows_as_subprocesses_with_divided_threads(tmp_path, capsys, fake_script):
    runs = str(tmp_path / "grid")
    argv = ["--rows", "finetune-mix-0.3", "finetune-mix-0.5", "--runs_dir", runs, "--epochs", "1",
            "--jobs", "2", "--data_dir", "D"]
    result = grid.main(argv, runner=refuse)
    printed = capsys.readouterr().out.splitlines()
    names = ["finetune-mix-0.3-seed0", "finetune-mix-0.5-seed0"]
    for name in names:
        with open(os.path.join(runs, name, "env.json")) as f:
            env = json.load(f)
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4"  # 8 cores / 2 jobs
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        with open(os.path.join(runs, "logs", name + ".log")) as f:
            assert f.read().startswith("fake trainer --option finetune")
    events = [line for line in printed if ": started" in line or ": finished" in line]
    assert [e.split(": ")[1].split(" ")[0] for e in events] == [
        "started", "started", "finished", "finished"]  # both at once
    assert sum("finished (exit 0)" in e for e in events) == 2
    assert [row["name"] for row in result["rows"]] == ["finetune-mix (0.3)", "finetune-mix (0.5)"]
    assert result["failed"] == []


def test_jobs_give_each_run_its_own_gpu(tmp_path, fake_script):
    runs = str(tmp_path / "grid")
    grid.main(["--rows", "finetune-mix-0.3", "finetune-mix-0.5", "--runs_dir", runs,
               "--epochs", "1", "--jobs", "2", "--gpus", "2,3"], runner=refuse)
    found = set()
    for name in ("finetune-mix-0.3-seed0", "finetune-mix-0.5-seed0"):
        with open(os.path.join(runs, name, "env.json")) as f:
            found.add(json.load(f)["CUDA_VISIBLE_DEVICES"])
    assert found == {"2", "3"}


def test_a_failed_row_names_its_log_and_the_grid_exits_non_zero(tmp_path, capsys, fake_script,
                                                                  monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_PCGRAD", "1")
    runs = str(tmp_path / "grid")
    argv = ["--rows", "finetune-mix-0.3", "finetune-mix-pcgrad-0.3", "--runs_dir", runs,
            "--epochs", "1", "--jobs", "2"]
    log = os.path.join(runs, "logs", "finetune-mix-pcgrad-0.3-seed0.log")
    with pytest.raises(grid.RunsFailed, match=re.escape(log)):
        grid.main(argv, runner=refuse)
    printed = capsys.readouterr().out
    assert "finetune-mix + PCGrad (0.3) seed 0: FAILED (exit 3)" in printed
    with open(log) as f:
        assert "boom: pcgrad failed" in f.read()
    with open(os.path.join(runs, "report", "table.md")) as f:  # the report of what finished
        table = f.read()
    assert "| finetune-mix (0.3) |" in table and "PCGrad" not in table
    again = str(tmp_path / "again")  # the fake's config.json is not the trainer's: a new folder
    monkeypatch.setattr("sys.argv", ["grid.py"] + argv[:4] + [again] + argv[5:])
    assert run_cli(grid.main) == 2
    assert os.path.join(again, "logs", "finetune-mix-pcgrad-0.3-seed0.log") in capsys.readouterr().err
