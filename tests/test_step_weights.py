"""steps.jsonl's "weights": the task weights each step's gradient combination applied, as
the per-task gradient buffer received them (pcgrad.PCGrad.apply) or, on a loss-only
combination's steps, as its one weighted backward took them (Combiner.weigh), averaged over
the steps of each logged window that combined the task gradients; absent where none did."""
import json
import os

import pytest
import torch

import multitask_classifier as mtc
import pcgrad
import report
from engine.combiner import Combiner
from engine.steplog import StepLog

from test_training import run_args


@pytest.fixture
def applied(monkeypatch):
    """Every weight vector handed to the per-task gradient buffer or taken by a loss-only
    step, in step order."""
    seen = []
    original, weigh = pcgrad.PCGrad.apply, Combiner.weigh

    def apply(self, weights):
        seen.append(weights.tolist())
        return original(self, weights)

    def weighed(self, losses):
        found = weigh(self, losses)
        seen.append(found.tolist())
        return found
    monkeypatch.setattr(pcgrad.PCGrad, "apply", apply)
    monkeypatch.setattr(Combiner, "weigh", weighed)
    return seen


def records(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]


TASKS = ("sst", "quora", "sts")


@pytest.mark.parametrize("flags", [["--aggregator", "rlw"], ["--pcgrad", "--balance", "uncertainty"]])
def test_each_step_logs_the_weights_applied(tiny_checkpoint, tiny_data, tmp_path, applied, flags):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--log_every_steps", "1", *flags))
    logged = [[r["weights"][t] for t in TASKS] for r in records(run_dir)]
    assert len(applied) == 6 and logged == applied  # 6 steps an epoch, every one combined
    assert len({tuple(w) for w in applied}) > 1  # the weights differ from step to step


def test_a_record_holds_the_mean_weights_of_its_window(tiny_checkpoint, tiny_data, tmp_path, applied):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--log_every_steps", "3", "--aggregator", "rlw"))
    found = records(run_dir)
    assert [r["step"] for r in found] == [3, 6]
    for record, window in zip(found, (applied[:3], applied[3:])):
        mean = [sum(w[k] for w in window) / 3 for k in range(3)]
        assert [record["weights"][t] for t in TASKS] == pytest.approx(mean, rel=1e-12)


def test_plain_steps_log_no_weights(tiny_checkpoint, tiny_data, tmp_path, applied):
    """The plain sum combines the task gradients on the diagnostics' steps only (3, 6);
    a window without one has no "weights" (a plain step's are all 1 by definition)."""
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--log_every_steps", "1", "--grad_diagnostics_every", "3"))
    found = records(run_dir)
    assert [r["step"] for r in found if "weights" in r] == [3, 6]
    assert all(r["weights"] == dict.fromkeys(TASKS, 1.0) for r in found if "weights" in r)
    assert all("loss" in r for r in found)
    seq = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "seq", "--epochs", "1",
                            "--log_every_steps", "1", "--mode", "seq"))
    assert not any("weights" in r for r in records(seq))


def test_a_last_pt_from_before_the_weights_still_loads(tmp_path):
    """last.pt of an older version holds no weight window: the window starts empty."""
    log = StepLog(str(tmp_path), list(TASKS), every=2)
    log.load_state_dict({"sums": [1.0, 2.0, 3.0], "count": 1})
    weights = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    record = log.add(2, 1, 0.1, [1.0, 1.0, 1.0], weights=weights)
    assert record["loss"] == {"sst": 1.0, "quora": 1.5, "sts": 2.0}
    assert record["weights"] == {"sst": 0.5, "quora": 1.0, "sts": 1.5}


def test_the_report_draws_a_trained_runs_weights(tiny_checkpoint, tiny_data, tmp_path):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "runs" / "rlw", "--epochs", "1",
                                "--log_every_steps", "2", "--aggregator", "rlw"))
    figure = os.path.join(tmp_path, "out", "runs", "rlw", "weights.png")
    assert figure in report.write_report(os.path.dirname(run_dir), str(tmp_path / "out"))["files"]
