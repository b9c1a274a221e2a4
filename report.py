"""Rebuilds the results table (the report's Table 1) and its figures from run folders alone.

    python report.py [RUNS_ROOT] [--out DIR]   # defaults: runs/grid, RUNS_ROOT/report

A run folder is any folder below RUNS_ROOT holding config.json and metrics.jsonl (written
by multitask_classifier.py; read by results.py); summary.json marks it complete. Runs are
grouped by `results.config_name`, so seeds of one configuration become one row (mean ±
sample std).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass, field


from engine.cli import parse_config, run_cli
from analysis.ablation import ablation, format_ablation
from analysis.compare import compare, format_comparison
from analysis.plots import (plot_forest, plot_method_weights, remove_stale, write_plots,
                            write_weight_plots)
from analysis.results import LABELS, METRICS, Run, config_slug, find_runs, group_runs, metric_value
from engine.runfiles import (CONFIG_FILE, METRICS_FILE, ResultsError, atomic_write, check_output,
                             write_json)


# --- table ------------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(name: str, runs: list[Run], complete: bool) -> dict:
    """One table row: each run's best epoch, then mean and std over the runs (seeds)."""
    bests = [(run, run.best()) for run in runs]
    bests = [(run, best) for run, best in bests if best is not None]
    status = "" if complete else (" (diverged)" if any(r.diverged for r in runs) else " (incomplete)")
    row = {"name": name + status, "config": name,
           "slug": config_slug(runs[0].config), "complete": complete,
           "runs": [os.path.basename(r.path) for r in runs],
           "seeds": [r.config.get("seed") for r, _ in bests],
           "best_epochs": [b.get("epoch") for _, b in bests],
           "epochs_done": [len(r.epochs) for r in runs], "mean": {}, "std": {}}
    for metric in METRICS:
        values = [metric_value(b, metric) for _, b in bests]
        values = [v for v in values if v is not None]
        if values:
            row["mean"][metric], row["std"][metric] = _stats(values)
    return row


def table_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """Finished runs make a configuration's row; unfinished ones a separate row marked
    '(incomplete)', so partial numbers never mix into the finished ones' mean."""
    rows = []
    for name, runs in groups.items():
        for complete in (True, False):
            subset = [r for r in runs if r.complete == complete]
            if subset:
                rows.append(summarize(name, subset, complete))
    return rows


def _cell(row: dict, metric: str) -> str:
    if metric not in row["mean"]:
        return "–"
    mean, std = row["mean"][metric], row["std"][metric]
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def format_table(rows: list[dict]) -> str:
    lines = ["| Method | " + " | ".join(LABELS[m] for m in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(_cell(row, m) for m in METRICS) + " |")
    lines += ["", "Dev-set scores at each run's best epoch (by overall); mean ± sample std "
              "over seeds where a configuration has several. The number in brackets is "
              "--hidden_dropout_prob, the dropout on the task heads' inputs (the STS cosine "
              "head has none; the encoder keeps its checkpoint's dropout).", ""]
    for row in rows:
        lines.append(f"- {row['name']}: seeds {row['seeds']}, best epochs {row['best_epochs']}, "
                     f"epochs run {row['epochs_done']}")
    return "\n".join(lines) + "\n"


# Settings that may differ between the runs of one table row without a note.
PER_RUN_SETTINGS = ("seed", "run_dir", "progress", "data_dir")


def mixed_settings(groups: dict[str, list[Run]]) -> list[str]:
    """Configurations whose runs differ in a setting other than the seed (budget, lr,
    encoding, ...), which a mean over them should not hide."""
    notes = []
    for name, runs in groups.items():
        keys = sorted({k for r in runs for k in r.config} - set(PER_RUN_SETTINGS))
        for key in keys:
            values = {json.dumps(r.config.get(key)) for r in runs}
            if len(values) > 1:
                notes.append(f"note: {name} mixes runs with different {key}: {sorted(values)}")
    return notes


# --- entry points -----------------------------------------------------------------------

def write_report(root: str, out: str | None = None, allow_empty: bool = False) -> dict:
    """Table and figures for every run below `root`; returns the markdown and the files.
    Every run is read before the output folder is made: a bad one leaves no folder.
    No run below `root` is a ResultsError, unless `allow_empty` (a grid whose runs failed)."""
    out = out or os.path.join(root, "report")
    check_output("--out", out, (root,))
    runs = find_runs(root)
    if not runs and not allow_empty:
        raise ResultsError(f"{root}: no run folders ({CONFIG_FILE} + {METRICS_FILE}) below it")
    check_finished(runs, root)
    groups = group_runs(runs)
    os.makedirs(out, exist_ok=True)
    for note in mixed_settings(groups):
        print(note)
    rows = table_rows(groups)
    markdown = format_table(rows)
    files = [os.path.join(out, "table.md"), os.path.join(out, "table.json")]
    atomic_write(files[0], lambda f: f.write(markdown))
    write_json(files[1], {"rows": rows})
    files += write_plots(groups, out)
    files += write_weight_plots(runs, root, out)
    comparison = compare(groups)
    files += write_comparison(comparison, out, groups)
    return {"table_md": markdown, "rows": rows, "files": files, "comparison": comparison}


def check_finished(runs: list[Run], root: str) -> None:
    """Runs without a finished epoch have no scores: named on stderr (a run that diverged
    keeps its row); if no run has one and none diverged, there is nothing to report."""
    empty = [run for run in runs if not run.epochs]
    if not empty:
        return
    names = ", ".join(run.path + (" (diverged)" if run.diverged else "") for run in empty)
    if len(empty) == len(runs) and not any(run.diverged for run in runs):
        raise ResultsError(f"no finished epoch in any run below {root}: {names}")
    print(f"warning: no finished epoch in {names}", file=sys.stderr)


COMPARISON_FILES = ("comparison.md", "comparison.json", "comparison.png", "comparison_weights.png")


def write_comparison(comparison: dict, out: str, groups: dict[str, list[Run]]) -> list[str]:
    """comparison.md/.json/.png (see compare.py) when the runs hold several methods, and
    comparison_weights.png: a panel per method of the task weights its complete runs applied."""
    md, js, png, weights = (os.path.join(out, name) for name in COMPARISON_FILES)
    if not comparison:
        print("skipping comparison.md: needs finetune-mix runs of more than one method")
        for name in COMPARISON_FILES:
            remove_stale(out, name)
        return []
    text = format_comparison(comparison)
    atomic_write(md, lambda f: f.write(text))
    write_json(js, comparison)
    written = [md, js]
    if plot_forest(comparison, png):
        written.append(png)
    else:
        remove_stale(out, "comparison.png", "no method has seeds paired with finetune-mix")
    methods = {e["name"]: [r for r in groups[e["name"]] if r.complete] for e in comparison["methods"]}
    if plot_method_weights(methods, weights):
        written.append(weights)
    else:
        remove_stale(out, "comparison_weights.png", "no compared run logged task weights")
    return written


def write_ablation(result: dict, out: str) -> list[str]:
    """ablation.md / ablation.json (analysis/ablation.py's result)."""
    md, js = os.path.join(out, "ablation.md"), os.path.join(out, "ablation.json")
    text = format_ablation(result)
    atomic_write(md, lambda f: f.write(text))
    write_json(js, result)
    print(text)
    return [md, js]


@dataclass
class ReportConfig:
    runs_root: str = field(default="runs/grid", metadata={
        "positional": True, "help": "folder searched (recursively) for run folders"})
    out: str = field(default="", metadata={"help": "output folder; empty: RUNS_ROOT/report"})
    ablation_base: str = field(default="", metadata={
        "help": "also write ablation.md/.json: every row (run folders named <row>-seed<N>, as "
                "grid.py --rows names them) against this base row, paired by seed"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ReportConfig, argv, description=__doc__)
    if not os.path.isdir(cfg.runs_root):
        raise ResultsError(f"{cfg.runs_root}: no such folder")
    # an unknown base row is refused before anything is written
    rows = ablation(find_runs(cfg.runs_root), cfg.ablation_base) if cfg.ablation_base else None
    result = write_report(cfg.runs_root, cfg.out or None)
    print(result["table_md"])
    if rows is not None:
        result["files"] += write_ablation(rows, cfg.out or os.path.join(cfg.runs_root, "report"))
    for path in result["files"]:
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
