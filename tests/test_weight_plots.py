"""The task-weight figures: REPORT/runs/<run>/weights.png per run whose steps.jsonl logged
weights, and comparison_weights.png with one panel per compared method."""
import json
import os
import shutil

import pytest

from analysis import plots
import report
from test_compare import MGDA, SUM, epochs
from test_report import PNG_SIGNATURE, write_run

RLW = dict(SUM, aggregator="rlw")


def write_steps(path, records):
    with open(os.path.join(path, "steps.jsonl"), "w") as f:
        for step, weights in records:
            record = {"step": step, "epoch": 1, "lr": 1e-3, "loss": {"sst": 1.0}}
            if weights is not None:
                record["weights"] = dict(zip(("sst", "quora", "sts"), weights))
            f.write(json.dumps(record) + "\n")


@pytest.fixture
def weighted_runs(tmp_path):
    """sum (no weights logged), mgda and rlw with two seeds each logging weights."""
    root = str(tmp_path / "runs")
    for seed in (0, 1):
        write_steps(write_run(root, f"sum-s{seed}", SUM, seed, epochs([0.7])), [(10, None)])
        write_steps(write_run(root, f"mgda/s{seed}", MGDA, seed, epochs([0.7])),
                    [(10, (0.2, 0.3, 0.5)), (20, (0.1 + seed, 0.4, 0.5))])
        write_steps(write_run(root, f"rlw-s{seed}", RLW, seed, epochs([0.7])),
                    [(10, (1.0, 1.0, 1.0)), (20, (3.0 - seed, 0.0, 0.0))])
    return root


@pytest.fixture
def saved(monkeypatch):
    """title -> the panels' titles and lines ({panel: {task: (xs, ys)}}) of each figure saved."""
    found = {}
    original = plots._save

    def save(fig, axes, path, title):
        visible = [ax for ax in axes.flat if ax.get_visible()]
        found[os.path.basename(path)] = {
            ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                             for line in ax.get_lines()} for ax in visible}
        return original(fig, axes, path, title)
    monkeypatch.setattr(plots, "_save", save)
    return found


def test_a_figure_per_run_with_weights_and_a_panel_per_method(weighted_runs, tmp_path, saved):
    out = str(tmp_path / "out")
    files = report.write_report(weighted_runs, out)["files"]
    per_run = sorted(os.path.relpath(p, out) for p in files if p.endswith("weights.png")
                     and "comparison" not in p)
    assert per_run == [os.path.join("runs", "mgda", f"s{s}", "weights.png") for s in (0, 1)] + [
        os.path.join("runs", f"rlw-s{s}", "weights.png") for s in (0, 1)]
    for path in per_run:
        with open(os.path.join(out, path), "rb") as f:
            assert f.read().startswith(PNG_SIGNATURE)
    figure = os.path.join(out, "comparison_weights.png")
    assert figure in files
    panels = saved["comparison_weights.png"]
    assert list(panels) == ["finetune-mix (0.3)", "finetune-mix + mgda (0.3)",
                            "finetune-mix + rlw (0.3)"]
    assert panels["finetune-mix (0.3)"] == {}  # a note, no lines: the sum logged no weights
    assert panels["finetune-mix + mgda (0.3)"]["sst"] == ([10, 20], [0.2, pytest.approx(0.6)])
    assert panels["finetune-mix + rlw (0.3)"]["sst"] == ([10, 20], [1.0, 2.5])  # mean of seeds
    assert panels["finetune-mix + rlw (0.3)"]["quora"] == ([10, 20], [1.0, 0.0])
    one_run = saved["weights.png"]  # the last run's own figure: its values, not a mean
    assert list(one_run.values())[0]["sst"] == ([10, 20], [1.0, 2.0])  # rlw-s1, written last


def test_figures_of_runs_without_weights_are_removed(weighted_runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    report.write_report(weighted_runs, out)
    assert os.path.isfile(os.path.join(out, "runs", "mgda", "s0", "weights.png"))
    assert os.path.isfile(os.path.join(out, "comparison_weights.png"))
    for folder in ("mgda", "rlw-s0", "rlw-s1"):
        shutil.rmtree(os.path.join(weighted_runs, folder))
    files = report.write_report(weighted_runs, out)["files"]
    assert not any(p.endswith("weights.png") for p in files)
    assert not os.path.exists(os.path.join(out, "runs", "mgda", "s0", "weights.png"))
    assert not os.path.exists(os.path.join(out, "comparison_weights.png"))
