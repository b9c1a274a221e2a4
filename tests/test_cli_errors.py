"""Every user mistake at an entry point ends in one line on stderr that names the file,
line, flag or folder, and exit code 2: no traceback, nothing silently wrong, and no
half-made folder left behind. Each case runs the real main(argv) under run_cli."""
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, fields

import pytest
import torch

import classifier
import export
import grid
from engine import grid_rows
import multitask_classifier as mtc
import predict
import report
from engine.cli import _arg_type, parse_config, run_cli
from engine.errors import ConfigError

from test_report import MIX, write_run
from test_training import run_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refuse(argv):
    raise AssertionError(f"nothing should run, got {argv}")


MAINS = {"multitask": mtc.main, "classifier": classifier.main, "predict": predict.main,
         "export": export.main, "report": report.main,
         "grid": lambda argv: grid.main(argv, runner=refuse)}


@dataclass
class Env:
    tmp: str
    checkpoint: str
    data: str
    monkeypatch: pytest.MonkeyPatch

    def path(self, *parts) -> str:
        return os.path.join(self.tmp, *parts)

    def config_file(self, content: dict) -> str:
        path = self.path("old", "config.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(content, f)
        return path

    def no_data(self) -> list[str]:
        return ["--checkpoint", self.checkpoint, "--data_dir", self.path("no-data"),
                "--max_length", "64"]

    def run_folder(self, *names: str) -> str:
        """A run folder holding these files (their content is never read)."""
        folder = self.path("run")
        os.makedirs(folder, exist_ok=True)
        for name in names:
            with open(os.path.join(folder, name), "w") as f:
                f.write("{}")
        return folder

    def resume_state(self) -> str:
        """A last.pt under another name: what it holds says it is a resume state."""
        path = self.path("state.pt")
        torch.save({"format": 1, "model": {}, "optimizers": {}, "progress": {},
                    "config": {}}, path)
        return path

    def report_root(self, *runs: tuple) -> str:
        root = self.path("runs")
        os.makedirs(root, exist_ok=True)
        for folder, epochs, complete in runs:
            write_run(root, folder, MIX, 0, epochs, complete=complete)
        return root


def config_case(content):
    def build(env):
        path = env.config_file(content)
        return "multitask", ["--config", path, *env.no_data()], [f"--config {path}"], []
    return build


def flags_case(script, *flags, says=()):
    """A bad flag; the data folder is empty, so that nothing trains if the flag passes."""
    return lambda env: (script, [*flags, *env.no_data()], [flags[0], *says], [])


def grid_case(*flags, says=()):
    def build(env):
        runs = env.path("grid")
        return "grid", [*flags, "--runs_dir", runs], [*says], [runs]
    return build


def no_run_dir_case(*extra, says=(), patch=None):
    def build(env):
        if patch:
            patch(env)
        run_dir = env.path("file", "run") if "UNDER_A_FILE" in extra else env.path("r")
        if "UNDER_A_FILE" in extra:
            with open(env.path("file"), "w") as f:
                f.write("a file, not a folder\n")
        argv = run_args(env.checkpoint, env.data, run_dir, "--epochs", "1",
                        *[a for a in extra if a != "UNDER_A_FILE"])
        named = [run_dir] if "UNDER_A_FILE" in extra else []
        return "multitask", argv, [*says, *named], [run_dir]
    return build


def no_tensorboard(env):
    env.monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def load_case(script, what):
    def build(env):
        if what == "last.pt":
            load = os.path.join(env.run_folder("config.json", "last.pt"), "last.pt")
            says = [f"--load {load}", "a resume state", "best.pt", f"--resume {env.path('run')}"]
        elif what == "renamed":
            load, says = env.resume_state(), [env.path("state.pt"), "a resume state"]
        else:
            load = env.run_folder("config.json", "best.pt")
            says = [f"--load {load}", "a run folder", os.path.join(load, "best.pt")]
        out = env.path("exported")
        argv = {"multitask": ["--eval_only", "--load", load],
                "predict": ["--load", load, "--task", "sst"],
                "export": ["--load", load, "--out", out]}[script]
        return script, argv, says, [out, env.path("eval")]
    return build


def resume_file_case(env):
    folder = env.run_folder("config.json", "last.pt")
    return ("multitask", ["--resume", os.path.join(folder, "config.json")],
            [f"--resume {os.path.join(folder, 'config.json')}", f"--resume {folder}"], [])


def folder_flag_case(script, flag):
    def build(env):
        argv = ["--load", env.path("best.pt")] if script == "predict" else env.no_data()
        argv += [flag, env.tmp]
        return script, argv, [f"{flag} {env.tmp}", "a folder"], []
    return build


def report_case(make, says):
    def build(env):
        root = make(env)
        return "report", [root], [s.replace("ROOT", root) for s in says], [
            os.path.join(root, "report")]
    return build


def duplicated_epoch(env):
    root = env.report_root(("a", [(0.4, 0.8, 0.8, 0.66)], True))
    path = os.path.join(root, "a", "metrics.jsonl")
    with open(path) as f:
        line = f.read()
    with open(path, "a") as f:
        f.write(line)
    return root


def corrupt_line(env):
    root = env.report_root(("a", [(0.4, 0.8, 0.8, 0.66)], False))
    with open(os.path.join(root, "a", "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "dev": {"sst"\n')
    return root


def empty_folder(env):
    os.makedirs(env.path("empty"))
    return env.path("empty")


CASES = {
    # B13: --config values are checked like the flags they stand for
    "config-string-for-int": config_case({"aggregator": "sum", "epochs": "2"}),
    "config-float-for-int": config_case({"aggregator": "sum", "epochs": 2.5}),
    "config-int-for-bool": config_case({"aggregator": "sum", "pcgrad": 1}),
    "config-string-for-float": config_case({"aggregator": "sum", "lr": "1e-3"}),
    "config-unknown-key": config_case({"aggregator": "sum", "lrr": 0.1}),
    "config-null": config_case({"aggregator": "sum", "lr": None}),
    "config-bad-choice": config_case({"aggregator": "sum", "mode": "mixx"}),
    "config-a-folder": lambda env: ("multitask", ["--config", env.tmp],
                                    [f"--config {env.tmp}", "a folder"], []),
    "config-of-two-processes": lambda env: (
        "multitask", ["--config", env.config_file({**asdict(mtc.MultitaskConfig()),
                                                   "data_dir": env.path("no-data"),
                                                   "checkpoint": env.checkpoint, "max_length": 64,
                                                   "world_size": 2})],
        ["2 processes", "--grad_accumulation 2"], []),
    # B13: every number in its range
    "seed-negative": flags_case("multitask", "--seed", "-1"),
    "seed-2**32": flags_case("multitask", "--seed", str(2 ** 32), says=["4294967296"]),
    "classifier-seed-negative": flags_case("classifier", "--seed", "-1"),
    "log-every-steps-negative": flags_case("multitask", "--log_every_steps", "-1"),
    "cagrad-c-negative": flags_case("multitask", "--cagrad_c", "-1"),
    "grid-seeds-negative": grid_case("--seeds", "0", "-1", says=["--seeds", "-1"]),
    "grid-seeds-not-a-number": grid_case("--seeds", "0,x", says=["--seeds", "'x'"]),
    "grid-epochs-zero": grid_case("--epochs", "0", says=["--epochs", "0"]),
    "grid-finetune-lr-negative": grid_case("--finetune_lr", "-1e-3", says=["--finetune_lr"]),
    "grid-extra-unbalanced-quote": grid_case("--extra=--aux 'x", says=["--extra"]),
    # B13: grid's own flags are not --extra's
    "grid-extra-seed": grid_case("--extra=--seed 5", says=["--extra", "--seed", "--seeds"]),
    "grid-extra-run-dir": grid_case("--extra=--run_dir=elsewhere", says=["--run_dir", "--runs_dir"]),
    "grid-extra-epochs": grid_case("--extra=--precision bf16 --epochs 2", says=["--epochs"]),
    "grid-extra-no-pcgrad": grid_case("--extra=--no-pcgrad", says=["--pcgrad", "--rows"]),
    "grid-extra-lr": grid_case("--extra=--lr 1e-4", says=["--lr", "--finetune_lr"]),
    "grid-extra-resume": grid_case("--extra=--resume somewhere", says=["--resume"]),
    # B13/B14: the run folder
    "run-dir-cannot-be-created": no_run_dir_case("UNDER_A_FILE", says=["--run_dir"]),
    "tensorboard-missing": no_run_dir_case("--tensorboard", says=["--tensorboard", "pip install"],
                                           patch=no_tensorboard),
    # B14: a path of the wrong kind
    "eval-load-last-pt": load_case("multitask", "last.pt"),
    "predict-load-last-pt": load_case("predict", "last.pt"),
    "export-load-last-pt": load_case("export", "last.pt"),
    "predict-load-renamed-last-pt": load_case("predict", "renamed"),
    "export-load-renamed-last-pt": load_case("export", "renamed"),
    "eval-load-run-folder": load_case("multitask", "folder"),
    "predict-load-run-folder": load_case("predict", "folder"),
    "export-load-run-folder": load_case("export", "folder"),
    "resume-a-file-of-the-run": resume_file_case,
    "aux-a-folder": folder_flag_case("multitask", "--aux"),
    "predict-input-a-folder": folder_flag_case("predict", "--input"),
    # B14: report.py
    "report-duplicated-epoch": report_case(duplicated_epoch, ["metrics.jsonl, line 2", "epoch 1"]),
    "report-corrupt-line": report_case(corrupt_line, ["metrics.jsonl, line 2"]),
    "report-empty-folder": report_case(empty_folder, ["ROOT", "no run folders"]),
    "report-no-finished-epoch": report_case(
        lambda env: env.report_root(("a", [], True), ("b", [], False)),
        ["no finished epoch", "ROOT/a, ROOT/b"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, tiny_checkpoint,
                                                           tiny_data, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = Env(str(tmp_path), tiny_checkpoint, tiny_data, monkeypatch)
    script, argv, says, absent = CASES[case](env)
    capsys.readouterr()
    code = run_cli(lambda: MAINS[script](argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in says:
        assert fragment in lines[0], (fragment, lines[0])
    for path in absent:
        assert not os.path.exists(path), f"{path} left behind"


# --- what is accepted -------------------------------------------------------------------

@pytest.mark.parametrize("content, given, expect", [
    ({"aggregator": "sum", "lr": 1}, [], {"lr": 1}),  # an int where a float is expected
    ({"aggregator": "sum", "world_size": 1}, [], {"aggregator": "sum"}),  # what a run writes beside
    ({"aggregator": "sum", "world_size": 2, "batch_size_sst": 8, "grad_accumulation": 1},
     ["--grad_accumulation", "2"], {"grad_accumulation": 2}),
    ({"aggregator": "sum", "world_size": 2}, ["--batch_size_sst", "16", "--batch_size_quora", "32",
                                        "--batch_size_sts", "12", "--batch_size_aux", "8"],
     {"batch_size_sst": 16}),
])
def test_config_values_of_the_right_kind_are_taken(tmp_path, monkeypatch, content, given, expect):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    cfg = parse_config(mtc.MultitaskConfig, ["--config", str(path), *given])
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_a_config_of_as_many_processes_needs_no_batch_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"aggregator": "sum", "world_size": 2}))
    assert parse_config(mtc.MultitaskConfig, ["--config", str(path)]).mode == "mix"
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="2 processes, this one has 4"):
        parse_config(mtc.MultitaskConfig, ["--config", str(path)])


@pytest.mark.parametrize("cls", [mtc.MultitaskConfig, classifier.ClassifierConfig,
                                 predict.PredictConfig, grid.GridOptions, export.ExportConfig,
                                 report.ReportConfig])
def test_every_int_option_has_a_range(cls):
    ints = {f.name for f in fields(cls) if _arg_type(f.type) is int}
    assert ints <= set(getattr(cls, "INT_RANGES", {})), ints - set(getattr(cls, "INT_RANGES", {}))


def test_grid_refuses_in_extra_every_flag_it_passes(tmp_path):
    opts = grid.GridOptions(subsample=10, finetune_lr=1e-4, pretrain_lr=1e-3,
                            checkpoint="ckpt", data_dir="data", aux="aux.csv")
    passed = set()
    for row in grid_rows.table1_rows("aux.csv") + grid_rows.methods_rows():
        argv = grid.trainer_argv(row, 3, str(tmp_path / "r"), opts)
        passed |= {a[2:] for a in argv if a.startswith("--")}
    assert passed <= set(grid_rows.GRID_FLAGS), passed - set(grid_rows.GRID_FLAGS)


def test_report_names_the_runs_without_a_finished_epoch_and_reports_the_rest(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "empty", MIX, 0, [], complete=False)
    write_run(root, "done", dict(MIX, pcgrad=True), 1, [(0.4, 0.8, 0.8, 0.66)])
    assert run_cli(lambda: report.main([root])) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if "empty" in line] == [
        f"warning: no finished epoch in {os.path.join(root, 'empty')}"]
    assert "| finetune-mix + PCGrad (0.3) | 0.400 |" in captured.out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_one_line(tiny_checkpoint, tiny_data, tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    run_dir = str(parent / "run")
    assert run_cli(lambda: mtc.main(run_args(tiny_checkpoint, tiny_data, run_dir))) == 2
    assert f"--run_dir {run_dir}: cannot create" in capsys.readouterr().err
    assert not os.path.exists(run_dir)


def test_under_torchrun_a_folder_that_cannot_be_made_is_one_line(tiny_checkpoint, tiny_data,
                                                                   tmp_path):
    """Every rank stops at once, and only rank 0 says why (no rank waits at a barrier for
    a process that has gone, then dies with a traceback)."""
    (tmp_path / "file").write_text("a file, not a folder\n")
    run_dir = str(tmp_path / "file" / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "multitask_classifier.py"),
         *run_args(tiny_checkpoint, tiny_data, run_dir, "--epochs", "1")],
        capture_output=True, text=True, env=env, timeout=300)
    ours = [line for line in done.stderr.splitlines() if line.startswith(("[rank", "error:"))]
    assert done.returncode != 0
    assert ours == [f"error: --run_dir {run_dir}: cannot create the folder (Not a directory: "
                    f"{run_dir})"], done.stderr[-3000:]
