"""The training options built separately (R-Drop, label smoothing, layer decay, two-head pair
tasks, EMA, task sampling, an aggregator) run together: each touches the step, the losses
or the heads, and a pairing none of their own tests covers must not crash or give NaN."""
import json
import math

import pytest

import multitask_classifier as mtc
from test_training import run_args

COMBINATIONS = {
    "rdrop+both+smoothing": ["--rdrop", "1", "--sts_encoding", "both", "--quora_encoding", "both",
                             "--label_smoothing", "0.1", "--label_smoothing_tasks", "sst,quora"],
    "rdrop+pcgrad+ema+decay+sampling": ["--rdrop", "1", "--sts_encoding", "both", "--pcgrad",
                                        "--ema", "0.9", "--layer_decay", "0.8",
                                        "--sampling", "temperature"],
    # each task's gradient from the one packed pass (engine/task_grads.py) with two-head
    # pair batches (a cross input and both single sentences in one batch)
    "both+mgda+ema": ["--sts_encoding", "both", "--quora_encoding", "both", "--aggregator",
                      "mgda", "--ema", "0.9"],
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_options_run_together(tiny_checkpoint, tiny_data, tmp_path, name):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "r", "--mode", "mix",
                                *COMBINATIONS[name]))
    summary = json.load(open(f"{run_dir}/summary.json"))
    assert set(summary["best"]) == {"sst", "quora", "sts", "overall"}
    assert all(math.isfinite(v) for v in summary["best"].values())
