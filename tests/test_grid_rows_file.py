"""grid.py --rows FILE.toml: named rows of trainer flags, crossed with the seeds, each run
into RUNS_DIR/<name>-seed<N>/ under its row's name (--label), checked before any run."""
import json
import os

import pytest

import grid
from analysis import results
from engine.cli import run_cli
from engine.errors import ConfigError
from test_grid import FakeTrainer, refuse, value

ROWS = """
[rows.base]
flags = "--weight_quora 2 --weight_sts 0.5"

[rows.sts-cross]
flags = ["--weight_quora", "2", "--weight_sts", "0.5", "--sts_encoding", "cross"]
"""


def rows_file(tmp_path, text=ROWS, name="rows.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_two_named_rows_train_on_the_tiny_checkpoint(tiny_checkpoint, tiny_data, tmp_path):
    runs = str(tmp_path / "grid")
    result = grid.main(["--rows", rows_file(tmp_path), "--runs_dir", runs, "--epochs", "1",
                        "--data_dir", tiny_data, "--checkpoint", tiny_checkpoint,
                        "--extra=--no-progress --max_length 32 --log_every_steps 0"])
    for name, encoding in (("base", "bi"), ("sts-cross", "cross")):
        folder = os.path.join(runs, f"{name}-seed0")
        assert os.path.isfile(os.path.join(folder, "summary.json"))
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        assert (saved["label"], saved["sts_encoding"], saved["weight_quora"]) == (name, encoding, 2.0)
    assert [row["name"] for row in result["rows"]] == ["base", "sts-cross"]
    assert "| base | " in result["table_md"] and "| sts-cross | " in result["table_md"]


def test_rows_cross_the_seeds_and_the_summary_names_them(tmp_path, capsys):
    runs = str(tmp_path / "grid")
    trainer = FakeTrainer()
    result = grid.main(["--rows", rows_file(tmp_path), "--seeds", "0", "1", "--runs_dir", runs,
                        "--epochs", "1", "--finetune_lr", "5e-5"], runner=trainer)
    assert [os.path.basename(value(a, "--run_dir")) for a in trainer.calls] == [
        "base-seed0", "sts-cross-seed0", "base-seed1", "sts-cross-seed1"]
    first = trainer.calls[0]
    assert first[:6] == ["--label", "base", "--weight_quora", "2", "--weight_sts", "0.5"]
    assert value(first, "--lr") == "5e-05" and value(first, "--seed") == "0"
    assert "[2/4] sts-cross seed 0 -> " in capsys.readouterr().out
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["base", "sts-cross"] and rows["base"]["seeds"] == [0, 1]
    assert rows["sts-cross"]["slug"] == "sts-cross"
    # one row by name; a row's own --lr wins over --finetune_lr
    path = rows_file(tmp_path, '[rows.fast]\nflags = "--lr 8e-5 --pcgrad"\n', "one.toml")
    trainer = FakeTrainer()
    grid.main(["--rows", path, "fast", "--runs_dir", str(tmp_path / "g2"), "--epochs", "1",
               "--finetune_lr", "5e-5"], runner=trainer)
    assert [value(a, "--lr") for a in trainer.calls] == ["8e-5"] and trainer.calls[0].count("--lr") == 1


def test_an_interrupted_named_grid_resumes(tmp_path, capsys):
    runs = str(tmp_path / "grid")
    argv = ["--rows", rows_file(tmp_path), "--runs_dir", runs, "--epochs", "1"]
    grid.main(argv, runner=FakeTrainer())
    saved, unsaved = (os.path.join(runs, f"{name}-seed0") for name in ("base", "sts-cross"))
    for folder in (saved, unsaved):  # killed: no summary; one had saved its last.pt
        os.remove(os.path.join(folder, "summary.json"))
    open(os.path.join(saved, "last.pt"), "wb").close()
    capsys.readouterr()
    trainer = FakeTrainer()

    def runner(call):
        if call[:1] == ["--resume"]:
            os.remove(os.path.join(saved, "last.pt"))
            with open(os.path.join(saved, "summary.json"), "w") as f:
                json.dump({"epochs": 1}, f)
            trainer.calls.append(call)
            return saved
        return trainer(call)
    result = grid.main(argv, runner=runner)
    assert trainer.calls[0] == ["--resume", saved]
    assert value(trainer.calls[1], "--run_dir") == unsaved and value(trainer.calls[1], "--label") == "sts-cross"
    out = capsys.readouterr().out
    assert "resuming from its last.pt" in out and "stopped before its first save" in out
    assert [row["name"] for row in result["rows"]] == ["base", "sts-cross"]
    grid.main(argv, runner=refuse)  # all done
    with pytest.raises(ConfigError, match="weight_sts: 0.5 there, 0.25 now"):  # a changed row
        grid.main(["--rows", rows_file(tmp_path, ROWS.replace("0.5", "0.25"))] + argv[2:],
                  runner=refuse)


BAD = [  # (rows file text, --extra, what the message must hold after the file name)
    ('[rows.base]\nflags = "--weight_quora 2"\n[rows.odd]\nflags = "--sts_encodng cross"\n', "",
     "row 'odd': unrecognized arguments: --sts_encodng cross"),
    ('[rows.base]\nflags = "--weight_sts x"\n', "", "row 'base': argument --weight_sts: invalid float value: 'x'"),
    ('[rows.base]\nflags = "--sts_encoding tri"\n', "", "row 'base': argument --sts_encoding: invalid choice"),
    ('[rows.base]\nflags = "--weight_sts -1"\n', "", "row 'base': --weight_sts must be a finite number"),
    ('[rows.base]\nflags = "--mode seq --pcgrad"\n', "", "row 'base': --pcgrad needs --mode mix"),
    ('[rows.base]\nflags = "--help"\n', "", "row 'base': --help is not a training flag"),
    ('[rows.base]\nflags = "--seed 3"\n', "", "row 'base' sets --seed, which grid sets itself"),
    ('[rows.base]\nflags = "--run_dir=x"\n', "", "row 'base' sets --run_dir, which grid sets itself"),
    ('[rows.base]\nflags = "--label other"\n', "", "row 'base' sets --label, which grid sets itself"),
    ('[rows.base]\nflags = "--resume x"\n', "", "row 'base' sets --resume: each grid run is a new"),
    ('[rows.base]\nflags = "--sts_encoding cross"\n', "--sts_encoding bi",
     "row 'base' sets --sts_encoding, which --extra sets too"),
    ('[rows.base]\nflags = "--sts_encoding cross"\n', "--bogus 1",
     "row 'base', with grid's flags: unrecognized arguments: --bogus 1"),
    ('[rows."Base row"]\nflags = ""\n', "", "row 'Base row': a row's name names its run folders"),
    ('[rows.base]\nflag = "--pcgrad"\n', "", "row 'base': expected flags = "),
    ('[rows.base]\nflags = "--pcgrad\n', "", "not valid TOML"),
    ('[other]\nx = 1\n', "", "expected [rows.NAME] tables"),
]


@pytest.mark.parametrize("text, extra, message", BAD)
def test_a_bad_row_is_refused_before_any_run(tmp_path, capsys, text, extra, message):
    path = rows_file(tmp_path, text)
    runs = tmp_path / "grid"
    code = run_cli(lambda: grid.main(["--rows", path, "--runs_dir", str(runs), "--epochs", "1",
                                      f"--extra={extra}"], runner=refuse))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --rows {path}") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not runs.exists()


def test_a_label_names_the_configuration():
    cfg = {"option": "finetune", "mode": "mix", "pcgrad": True, "label": "My row"}
    assert results.config_name(cfg) == "My row" and results.config_slug(cfg) == "my-row"
    assert results.config_name(dict(cfg, label="")) == "finetune-mix + PCGrad (0.3)"
