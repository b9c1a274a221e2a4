"""Rebuilds the results table (the report's Table 1) and its figures from run folders alone.

    python report.py [RUNS_ROOT] [--out DIR]   # defaults: runs/grid, RUNS_ROOT/report

A run folder is any folder below RUNS_ROOT holding config.json and metrics.jsonl (written
by multitask_classifier.py); summary.json marks it complete. Runs are grouped by
`config_name`, so seeds of one configuration become one row (mean ± sample std).
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Iterable

from config import parse_config
from utils import atomic_write, write_json


TASKS = ("sst", "quora", "sts")
METRICS = TASKS + ("overall",)
LABELS = {"sst": "SST acc", "quora": "Quora acc", "sts": "STS corr", "overall": "Overall"}


# --- naming -----------------------------------------------------------------------------

def dropout_label(cfg: dict) -> str:
    return f"{float(cfg.get('hidden_dropout_prob', 0.0)):g}"


def _method(cfg: dict) -> str:
    base = "pretrain" if cfg.get("option") == "pretrain" else "finetune"
    if base == "finetune" or cfg.get("mode") == "seq":
        base += f"-{cfg.get('mode', 'mix')}"
    return base


def _extras(cfg: dict) -> list[str]:
    return [label for key, label in (("pcgrad", "PCGrad"), ("aux", "aux")) if cfg.get(key)]


def config_name(cfg: dict) -> str:
    """Display name of a configuration, e.g. 'finetune-mix + PCGrad (0.3)'."""
    dropout = dropout_label(cfg)
    if cfg.get("option") == "pretrain":
        dropout = f"dropout {dropout}"
    return " + ".join([_method(cfg)] + _extras(cfg)) + f" ({dropout})"


def config_slug(cfg: dict) -> str:
    """Filesystem-safe name of a configuration, e.g. 'finetune-mix-pcgrad-0.3'."""
    return "-".join([_method(cfg)] + [e.lower() for e in _extras(cfg)] + [dropout_label(cfg)])


def sort_key(cfg: dict) -> tuple:
    """Table 1's row order: pretrain, finetune-seq, finetune-mix, + PCGrad, + aux."""
    return (cfg.get("option") != "pretrain", cfg.get("mode") != "seq", bool(cfg.get("aux")),
            bool(cfg.get("pcgrad")), float(cfg.get("hidden_dropout_prob", 0.0)))


# --- loading ----------------------------------------------------------------------------

@dataclass
class Run:
    path: str
    config: dict
    epochs: list[dict]
    summary: dict | None

    @property
    def complete(self) -> bool:
        return self.summary is not None

    def best(self) -> dict | None:
        """The epoch with the highest dev overall score (the first one on ties)."""
        scored = [e for e in self.epochs if e.get("overall") is not None]
        return max(scored, key=lambda e: e["overall"]) if scored else None


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_metrics(path: str) -> list[dict]:
    """Epoch records; a line that does not parse is skipped, since a running trainer may be
    halfway through writing the last one."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return sorted(records, key=lambda r: r.get("epoch", 0))


def load_run(path: str) -> Run:
    return Run(path=path, config=_read_json(os.path.join(path, "config.json")) or {},
               epochs=read_metrics(os.path.join(path, "metrics.jsonl")),
               summary=_read_json(os.path.join(path, "summary.json")))


def find_runs(root: str) -> list[Run]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "config.json" in files and "metrics.jsonl" in files:
            found.append(load_run(folder))
    return found


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs by configuration name, in Table 1's order."""
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (sort_key(r.config), r.config.get("seed") or 0, r.path)):
        groups.setdefault(config_name(run.config), []).append(run)
    return groups


# --- table ------------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(name: str, runs: list[Run], complete: bool) -> dict:
    """One table row: each run's best epoch, then mean and std over the runs (seeds)."""
    bests = [(run, run.best()) for run in runs]
    bests = [(run, best) for run, best in bests if best is not None]
    row = {"name": name if complete else f"{name} (incomplete)", "config": name,
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


def metric_value(epoch: dict, metric: str) -> float | None:
    return epoch.get("overall") if metric == "overall" else epoch.get("dev", {}).get(metric)


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
              "over seeds where a configuration has several.", ""]
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

def write_report(root: str, out: str | None = None) -> dict:
    """Table and figures for every run below `root`; returns the markdown and the files."""
    out = out or os.path.join(root, "report")
    os.makedirs(out, exist_ok=True)
    groups = group_runs(find_runs(root))
    if not groups:
        print(f"no run folders (config.json + metrics.jsonl) found below {root}")
    for note in mixed_settings(groups):
        print(note)
    rows = table_rows(groups)
    markdown = format_table(rows)
    files = [os.path.join(out, "table.md"), os.path.join(out, "table.json")]
    atomic_write(files[0], lambda f: f.write(markdown))
    write_json(files[1], {"rows": rows})
    from plots import write_plots  # imported here: plots.py builds on this module
    files += write_plots(groups, out)
    return {"table_md": markdown, "rows": rows, "files": files}


@dataclass
class ReportConfig:
    runs_root: str = field(default="runs/grid", metadata={
        "positional": True, "help": "folder searched (recursively) for run folders"})
    out: str = field(default="", metadata={"help": "output folder; empty: RUNS_ROOT/report"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ReportConfig, argv, description=__doc__)
    if not os.path.isdir(cfg.runs_root):
        raise SystemExit(f"error: {cfg.runs_root}: no such folder")
    result = write_report(cfg.runs_root, cfg.out or None)
    print(result["table_md"])
    for path in result["files"]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
