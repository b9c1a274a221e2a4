"""What a command writes never destroys what it did not make (its inputs, run folders), and
one run owns its folder: created exclusively, locked for the run's whole life."""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

import export
import grid
import multitask_classifier as mtc
import predict
import report
from engine import run
from engine.cli import run_cli

from test_training import run_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, tiny_data, tmp_path_factory):
    """A folder of runs holding one finished tiny run."""
    runs = tmp_path_factory.mktemp("finished") / "runs"
    mtc.main(run_args(tiny_checkpoint, tiny_data, runs / "run", "--epochs", "1"))
    return str(runs)


@pytest.fixture
def paths(finished, tiny_checkpoint, tiny_data, tmp_path):
    """Copies a command may damage without harming the other tests."""
    shutil.copytree(finished, tmp_path / "runs")
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    shutil.copytree(tiny_data, tmp_path / "data")
    (tmp_path / "in.txt").write_text("the movie is great .\n")
    run_dir = str(tmp_path / "runs" / "run")
    return SimpleNamespace(tmp=tmp_path, runs=str(tmp_path / "runs"), run=run_dir,
                           best=os.path.join(run_dir, "best.pt"), data=str(tmp_path / "data"),
                           checkpoint=str(tmp_path / "checkpoint"), input=str(tmp_path / "in.txt"))


def snapshot(folder: str) -> dict[str, str]:
    """Every file below `folder` -> its digest."""
    found = {}
    for here, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def cli(main, argv) -> int:
    return run_cli(lambda: main(argv))


def refuse(argv):
    raise AssertionError(f"nothing should run, got {argv}")


def earlier_export(p, inside: str = "") -> str:
    out = str(p.tmp / "hf")
    assert cli(export.main, ["--load", p.best, "--out", out]) == 0
    if inside:  # a run folder someone moved into the export folder
        shutil.copytree(p.run, os.path.join(out, inside))
    return out


def notes_folder(p) -> str:
    os.makedirs(p.tmp / "notes")
    (p.tmp / "notes" / "todo.txt").write_text("mine\n")
    return str(p.tmp / "notes")


# name -> p -> (command, argv, the flag and path the refusal names, the folder left intact)
REFUSED = {
    "export --force onto its own run folder": lambda p: (
        export.main, ["--load", p.best, "--out", p.run, "--force"], "--out", p.run, p.runs),
    "export --force onto a folder of runs": lambda p: (
        export.main, ["--load", p.best, "--out", p.runs, "--force"], "--out", p.runs, p.runs),
    "export --force onto an export holding a run": lambda p: (
        export.main, ["--load", p.best, "--out", earlier_export(p, "run2"), "--force"],
        "--out", str(p.tmp / "hf"), str(p.tmp / "hf")),
    "export --force onto other files": lambda p: (
        export.main, ["--load", p.best, "--out", notes_folder(p), "--force"], "--out",
        str(p.tmp / "notes"), str(p.tmp / "notes")),
    "export --force onto its checkpoint": lambda p: (
        export.main, ["--load", p.best, "--checkpoint", p.checkpoint, "--out", p.checkpoint,
                      "--force"], "--out", p.checkpoint, p.checkpoint),
    "predict --output onto its --load": lambda p: (
        predict.main, ["--load", p.best, "--input", p.input, "--output", p.best],
        "--output", p.best, p.runs),
    "predict --output onto its --input": lambda p: (
        predict.main, ["--load", p.best, "--input", p.input, "--output", p.input],
        "--output", p.input, str(p.tmp)),
    "predict --output onto a run's file": lambda p: (
        predict.main, ["--load", p.best, "--input", p.input, "--output",
                       os.path.join(p.run, "metrics.jsonl")],
        "--output", os.path.join(p.run, "metrics.jsonl"), p.runs),
    "eval_only --run_dir onto a run folder": lambda p: (
        mtc.main, ["--eval_only", "--load", p.best, "--data_dir", p.data, "--run_dir", p.run],
        "--run_dir", p.run, p.runs),
    "eval_only --run_dir onto its data folder": lambda p: (
        mtc.main, ["--eval_only", "--load", p.best, "--data_dir", p.data, "--run_dir", p.data],
        "--run_dir", p.data, p.data),
    "training --run_dir onto its checkpoint": lambda p: (
        mtc.main, run_args(p.checkpoint, p.data, p.checkpoint, "--epochs", "1"),
        "--run_dir", p.checkpoint, p.checkpoint),
    "report --out onto a run folder": lambda p: (
        report.main, [p.runs, "--out", p.run], "--out", p.run, p.runs),
    "report --out onto the folder it reads": lambda p: (
        report.main, [p.run, "--out", p.runs], "--out", p.runs, p.runs),
    "grid --runs_dir onto a run folder": lambda p: (
        lambda argv: grid.main(argv, runner=refuse),
        ["--runs_dir", p.run, "--rows", "pretrain-0.3", "--data_dir", p.data], "--runs_dir",
        p.run, p.runs),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_output_over_what_the_command_did_not_make_is_refused(paths, capsys, case):
    main, argv, flag, named, intact = REFUSED[case](paths)
    before = snapshot(intact)
    capsys.readouterr()
    assert cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} {named}"), err
    assert snapshot(intact) == before


def test_export_force_replaces_an_earlier_export(paths, capsys):
    out = earlier_export(paths)
    os.remove(os.path.join(out, "vocab.txt"))  # what --force writes again
    assert cli(export.main, ["--load", paths.best, "--out", out]) == 2  # not without --force
    assert cli(export.main, ["--load", paths.best, "--out", out, "--force"]) == 0
    assert os.path.isfile(os.path.join(out, "vocab.txt"))
    assert not [n for n in os.listdir(paths.tmp) if n.startswith(".")]


def test_predict_output_over_its_own_earlier_output_is_fine(paths):
    out = os.path.join(paths.run, "predicted.tsv")
    argv = ["--load", paths.best, "--input", paths.input, "--output", out]
    assert cli(predict.main, argv) == 0 and cli(predict.main, argv) == 0
    assert open(out).read().count("\n") == 1


# --- one run per folder --------------------------------------------------------------------

def test_a_taken_time_stamped_name_gets_a_suffix(tmp_path):
    from engine.runlock import claim_run_dir
    base = str(tmp_path / "runs" / "finetune-mix-20240101-000000")
    with claim_run_dir("--run_dir", "", base) as first:
        with claim_run_dir("--run_dir", "", base) as second:
            assert (first, second) == (base, base + "-2")
    with claim_run_dir("--run_dir", "", base) as third:  # released, but made: still taken
        assert third == base + "-3"


def test_two_runs_started_in_the_same_second_get_two_folders(tiny_checkpoint, tiny_data,
                                                             tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run.time, "strftime", lambda *_: "20240101-000000")
    argv = run_args(tiny_checkpoint, tiny_data, "", "--epochs", "1")
    first, second = mtc.main(argv), mtc.main(argv)
    assert second == first + "-2"
    for folder in (first, second):
        assert open(os.path.join(folder, "metrics.jsonl")).read().count("\n") == 1


HOLD = ("import sys\nfrom engine.runlock import run_lock\n"
        "with run_lock(sys.argv[1], '--run_dir'):\n    print('held', flush=True)\n"
        "    sys.stdin.read()\n")


@contextmanager
def held_elsewhere(folder: str):
    """Another process holding the folder's lock (as a run in progress does); its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, folder], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def interrupted(p) -> str:
    """A folder with a run's config and a last.pt: what --resume continues."""
    folder = p.tmp / "interrupted"
    folder.mkdir()
    shutil.copy(os.path.join(p.run, "config.json"), folder)
    import torch  # a resume state of a run saved before fingerprints (read, then let through)
    torch.save({"format": 1, "model": {}, "optimizers": {}, "progress": {}}, folder / "last.pt")
    return str(folder)


def empty(p) -> str:
    os.makedirs(p.tmp / "empty")
    return str(p.tmp / "empty")


def stopped_grid_run(p) -> str:
    """A grid run folder without a save yet (the grid would clear it and start again)."""
    folder = p.tmp / "grid" / "finetune-mix-0.3-seed0"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(p.run, "config.json"), folder)
    return str(folder)


# name -> p -> (the locked folder, command, argv, flag named)
LOCKED = {
    "a new run": lambda p, d: (mtc.main, run_args(p.checkpoint, p.data, d, "--epochs", "1"),
                               "--run_dir"),
    "a resume": lambda p, d: (mtc.main, ["--resume", d, "--no-progress"], "--resume"),
    "an --eval_only": lambda p, d: (mtc.main, ["--eval_only", "--load", p.best, "--data_dir",
                                               p.data, "--run_dir", d], "--run_dir"),
    "a grid clearing it": lambda p, d: (
        lambda argv: grid.main(argv, runner=refuse),
        ["--runs_dir", os.path.dirname(d), "--rows", "finetune-mix-0.3", "--data_dir", p.data,
         "--checkpoint", p.checkpoint], "--runs_dir"),
}
FOLDERS = {"a new run": empty, "a resume": interrupted, "an --eval_only": empty,
           "a grid clearing it": stopped_grid_run}


@pytest.mark.parametrize("case", list(LOCKED))
def test_a_folder_in_use_is_refused_naming_its_holder(paths, capsys, case):
    folder = FOLDERS[case](paths)
    main, argv, flag = LOCKED[case](paths, folder)
    with held_elsewhere(folder) as pid:
        before = snapshot(folder)
        capsys.readouterr()
        assert cli(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert snapshot(folder) == before
    assert len(err) == 1 and flag in err[0] and folder in err[0], err
    assert f"pid {pid} on {socket.gethostname()} since " in err[0], err
    assert not os.path.exists(os.path.join(folder, ".lock"))  # released with its holder


def test_a_killed_runs_lock_never_blocks_its_resume(tiny_checkpoint, tiny_data, tmp_path):
    from test_resume import killed
    run_dir = tmp_path / "run"
    done = killed("multitask", run_args(tiny_checkpoint, tiny_data, run_dir, "--epochs", "1",
                                        "--save_every_steps", "4"), 1)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (run_dir / ".lock").exists()  # it held the lock when it died: the OS let go
    mtc.main(["--resume", str(run_dir), "--no-progress"])
    assert (run_dir / "summary.json").exists() and not (run_dir / ".lock").exists()
