"""Interrupted runs continue exactly: kill a run (SIGKILL) right after an epoch and in the
middle of one, resume it, and compare with an uninterrupted run of the same seed."""
import json
import multiprocessing
import os
import signal
import subprocess
import tempfile

import pytest
import torch

import multitask_classifier as mtc
from engine.cli import run_cli
from engine.compiling import BACKEND_ENV
from engine.errors import ConfigError
from evaluation import read_predictions

import die_after_save
from test_training import run_args

FORKS = multiprocessing.get_context("forkserver")
# What die_after_save imports, by names the server can import: Python 3.11's forkserver
# starts in the working directory (the checkout under `make test`) with its default path,
# not ours (an import that fails there is skipped: the child then imports it, slower).
FORKS.set_forkserver_preload(["torch", "multitask_classifier", "classifier", "engine.trainer"])


def killed(script: str, argv: list[str], saves: int, sig: str = "KILL") -> subprocess.CompletedProcess:
    """The script run in a process of its own and killed (KILL, TERM or INT) right after its
    Nth save (tests/die_after_save.py), forked from a server that imported torch once."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = FORKS.Process(target=die_after_save.run_killed,
                                args=(script, [str(a) for a in argv], saves, sig, env, out, err))
        process.start()
        process.join(120)
        if process.is_alive():
            process.kill()
            process.join()
            pytest.fail(f"the killed run of {argv} was still running after 120 s")
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess(argv, process.exitcode, o.read(), e.read())


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def steps(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(resumed, reference):
    assert metrics(resumed) == metrics(reference)
    assert steps(resumed) == steps(reference)  # the live log holds each step once
    a = torch.load(os.path.join(resumed, "best.pt"), weights_only=True)
    b = torch.load(os.path.join(reference, "best.pt"), weights_only=True)
    assert a["epoch"] == b["epoch"] and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in os.listdir(os.path.join(reference, "predictions")):
        assert read_predictions(os.path.join(resumed, "predictions", name)) == \
            read_predictions(os.path.join(reference, "predictions", name))
    assert not os.path.exists(os.path.join(resumed, "last.pt"))  # complete: removed


# 24 examples in batches of 4: 6 steps an epoch; with --save_every_steps 4 the saves are
# after step 4, at the end of epoch 1 (step 6), after step 8 (epoch 2, step 2), ...
EXTRA = ["--epochs", "3", "--save_every_steps", "4", "--log_every_steps", "3"]


class Runs(dict):
    """The uninterrupted runs, each made the first time a test asks for its mode."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, mode):
        self[mode] = self.make(mode)
        return self[mode]


def uninterrupted_runs(tiny_checkpoint, tiny_data, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("reference")
    return Runs(lambda mode: mtc.main(run_args(tiny_checkpoint, tiny_data, root / mode, *EXTRA,
                                               *MODES[mode])))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tiny_data, tmp_path_factory):
    return uninterrupted_runs(tiny_checkpoint, tiny_data, tmp_path_factory)


MODES = {"mix-pcgrad": ["--mode", "mix", "--pcgrad", "--hidden_dropout_prob", "0.1"],
         # the diagnostics on steps 3, 6, ...: saves at steps 4 and 8 fall between them
         "mix-sampled": ["--mode", "mix", "--grad_diagnostics_every", "3"],
         "seq": ["--mode", "seq"],
         # fp16 autocast with loss scaling, on the CPU: the GradScaler's state is in last.pt
         "mix-fp16": ["--mode", "mix", "--precision", "fp16", "--aggregator", "aligned_mtl"],
         # R-Drop's second pass draws more dropout masks; one optimizer group per layer
         "mix-rdrop-layer-decay": ["--mode", "mix", "--rdrop", "1.0", "--layer_decay", "0.7",
                                   "--sts_loss", "cosent", "--label_smoothing", "0.1"],
         # sampled steps of 8 examples (each task 2 or 3 at random): 9 steps an epoch, so
         # the kills fall after step 8 (mid-epoch 1) and just after epoch 1 (step 9); the
         # tasks' streams run on across the epochs
         "mix-temperature": ["--mode", "mix", "--pcgrad", "--sampling", "temperature",
                             "--sampling_temperature", "1", "--sampling_batch_size", "8"],
         "mix-annealed": ["--mode", "mix", "--sampling", "annealed", "--sampling_batch_size", "8",
                          "--grad_diagnostics_every", "3"],
         # the moving average of the weights (its shadow and update count are in last.pt)
         "mix-ema": ["--mode", "mix", "--ema", "0.9"],
         # pair tasks with a cross and a bi head each (one batch holds a pair both ways)
         "mix-both": ["--mode", "mix", "--sts_encoding", "both", "--quora_encoding", "both"],
         # stateful combinations: GradVac's targets and order, FAMO's logits, Adam moments
         # and last losses, the smoothed weights (beta 1/2: the state moves fast)
         "mix-gradvac-famo": ["--mode", "mix", "--aggregator", "gradvac", "--gradvac_beta", "0.5",
                              "--balance", "famo", "--smooth_weights", "0.5"],
         # a loss-only combination: its weights from the losses before one backward
         # (combiner.LossWeights), the rows on the diagnostics' steps 3, 6, 9 only
         "mix-rlw-famo": ["--mode", "mix", "--aggregator", "rlw", "--balance", "famo",
                          "--grad_diagnostics_every", "3"],
         # each task's gradient from one packed pass (engine/task_grads.py), the balancer's
         # state in last.pt; "mix-pcgrad" above takes that path too, the word rows sparse
         "mix-mgda-gradnorm": ["--mode", "mix", "--aggregator", "mgda", "--balance", "grad_norm",
                               "--sts_encoding", "bi", "--pooling", "pooler"]}


# Both kill points where the data's position is the state at stake (an epoch's end and inside
# one); the modes whose extra state lives in the optimizer, the model or the combiner save it
# the same way at either point: tests/test_resume_state.py kills them mid-epoch only.
STREAM_MODES = ("mix-pcgrad", "mix-sampled", "seq", "mix-temperature", "mix-annealed")


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("saves, where", [(2, "just after epoch 1"), (3, "mid-epoch 2")])
def test_killed_run_resumes_to_the_same_result(tiny_checkpoint, tiny_data, tmp_path, reference,
                                               mode, saves, where):
    kill_and_resume(tiny_checkpoint, tiny_data, tmp_path, reference, mode, saves)


def kill_and_resume(tiny_checkpoint, tiny_data, tmp_path, reference, mode, saves):
    run_dir = tmp_path / "run"
    argv = run_args(tiny_checkpoint, tiny_data, run_dir, *EXTRA, *MODES[mode])
    done = killed("multitask", argv, saves)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not os.path.exists(run_dir / "summary.json")
    # The epoch-end save comes before the epoch's metrics line, so a kill right after it
    # leaves a metrics.jsonl without epoch 1: never an epoch that a resume would redo.
    lines = metrics(run_dir) if os.path.exists(run_dir / "metrics.jsonl") else []
    assert len(lines) <= (1 if saves == 3 else 0)
    mtc.main(["--resume", str(run_dir), "--no-progress"])
    assert_same_run(str(run_dir), reference[mode])


@pytest.mark.parametrize("mode", ["mix-pcgrad", "mix-fp16"])
def test_the_split_windows_hold_weights_that_vary(reference, mode):
    """steps.jsonl's mean task weights resume exactly only if last.pt keeps the window in
    progress (StepLog.state_dict): the kill after step 8 splits the window of steps 7-9,
    whose weights (PCGrad's, Aligned-MTL's) vary, so a lost part would change its mean."""
    logged = {r["step"]: r["weights"] for r in steps(reference[mode])}
    assert 9 in logged and len({tuple(w.values()) for w in logged.values()}) > 1


def test_a_run_with_frozen_word_embeddings_resumes_exactly(tiny_checkpoint, tiny_data, tmp_path):
    flags = [*EXTRA, "--pcgrad", "--weight_decay", "0.1", "--freeze_word_embeddings"]
    reference = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "reference", *flags))
    run_dir = tmp_path / "run"
    done = killed("multitask", run_args(tiny_checkpoint, tiny_data, run_dir, *flags), 3)
    assert done.returncode == -signal.SIGKILL, done.stderr
    mtc.main(["--resume", str(run_dir), "--no-progress"])
    assert_same_run(str(run_dir), reference)


def test_a_compiled_run_resumes_exactly(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    """--compile, with Dynamo's eager backend (MINBERT_COMPILE_BACKEND: torch's own kernels),
    killed mid-epoch 2 and resumed (compiled afresh): it ends bit for bit where the eager run
    ends (without the diagnostics steps, whose compiled per-task passes sum in another order
    than the eager packed pass: test_compile.py compares those); its files hold plain keys."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv(BACKEND_ENV, "eager")
    flags = [*EXTRA, "--mode", "mix", "--no-grad_diagnostics"]
    eager = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "eager", *flags))
    run_dir = tmp_path / "run"
    done = killed("multitask", run_args(tiny_checkpoint, tiny_data, run_dir, *flags, "--compile"), 3)
    assert done.returncode == -signal.SIGKILL, done.stderr
    keys = torch.load(run_dir / "last.pt", weights_only=True)["model"].keys()
    counters.clear()
    mtc.main(["--resume", str(run_dir), "--no-progress"])
    assert counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
    assert_same_run(str(run_dir), eager)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["config"]["compile"] is True and keys == best["model"].keys()
    assert not any("_orig_mod" in key for key in keys)


def test_sigterm_saves_and_says_how_to_resume(tiny_checkpoint, tiny_data, tmp_path, reference,
                                              capsys):
    run_dir = tmp_path / "run"
    argv = run_args(tiny_checkpoint, tiny_data, run_dir, *EXTRA, *MODES["mix-pcgrad"])
    done = killed("multitask", argv, 1, "TERM")
    assert done.returncode == 143
    assert f"interrupted at epoch 1, step 4; state saved. Continue with: --resume {run_dir}" \
        in done.stderr.strip().splitlines()[-1]
    # the script's entry point in this process (a process start fewer): its exit code and line
    assert run_cli(lambda: mtc.main(argv)) == 2
    assert "holds an interrupted run; continue it with --resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="would change it: --lr"):
        mtc.main(["--resume", str(run_dir), "--lr", "0.1"])
    mtc.main(["--resume", str(run_dir), "--no-progress"])
    assert_same_run(str(run_dir), reference["mix-pcgrad"])


def test_a_diverging_run_stops_with_one_line_and_writes_no_nan(tiny_checkpoint, tiny_data, tmp_path,
                                                               capsys):
    run_dir = tmp_path / "run"
    argv = run_args(tiny_checkpoint, tiny_data, run_dir, "--epochs", "3", "--lr", "1e9",
                    "--save_every_steps", "0")
    code = run_cli(lambda: mtc.main(argv))  # the script's entry point, in this process
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: loss became nan at epoch") and "(lr 1e+09)" in line
    assert "last good checkpoint:" in line
    for name in os.listdir(run_dir):
        if name.endswith((".json", ".jsonl")):
            text = open(run_dir / name).read()
            assert "NaN" not in text and "Infinity" not in text
    import report
    result = report.write_report(str(tmp_path))
    assert "(diverged)" in result["table_md"]
