"""Rebuilds the results table (the report's Table 1) and its figures from run folders alone.

    python report.py RUNS_ROOT [--out DIR]        # default out: RUNS_ROOT/report

A run folder is any folder below RUNS_ROOT holding config.json and metrics.jsonl (written
by multitask_classifier.py); summary.json marks it complete. Runs are grouped by
`config_name`, so seeds of one configuration become one row (mean ± sample std).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable

import matplotlib

matplotlib.use("Agg")  # files only: this also runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TASKS = ("sst", "quora", "sts")
METRICS = TASKS + ("overall",)
LABELS = {"sst": "SST acc", "quora": "Quora acc", "sts": "STS corr", "overall": "Overall"}
DPI = 100


# --- naming -----------------------------------------------------------------------------

def _dropout(cfg: dict) -> str:
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
    dropout = _dropout(cfg)
    if cfg.get("option") == "pretrain":
        dropout = f"dropout {dropout}"
    return " + ".join([_method(cfg)] + _extras(cfg)) + f" ({dropout})"


def config_slug(cfg: dict) -> str:
    """Filesystem-safe name of a configuration, e.g. 'finetune-mix-pcgrad-0.3'."""
    return "-".join([_method(cfg)] + [e.lower() for e in _extras(cfg)] + [_dropout(cfg)])


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
        values = [_metric(b, metric) for _, b in bests]
        values = [v for v in values if v is not None]
        if values:
            row["mean"][metric], row["std"][metric] = _stats(values)
    return row


def _metric(epoch: dict, metric: str) -> float | None:
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


def mixed_settings(groups: dict[str, list[Run]]) -> list[str]:
    """Configurations whose runs differ in budget, which a seed mean should not hide."""
    notes = []
    for name, runs in groups.items():
        for key in ("epochs", "subsample"):
            values = {json.dumps(r.config.get(key)) for r in runs}
            if len(values) > 1:
                notes.append(f"note: {name} mixes runs with different {key}: {sorted(values)}")
    return notes


# --- figures ----------------------------------------------------------------------------

def mean_curve(runs: list[Run], value: Callable[[dict], float | None]) -> tuple[list, list]:
    """Per-epoch mean over the runs that have a value at that epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for record in run.epochs:
            v = value(record)
            if v is not None and "epoch" in record:
                by_epoch.setdefault(record["epoch"], []).append(v)
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def _style(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, axes, path: str, title: str) -> str:
    """One legend for all panels (a configuration may lack data in some of them)."""
    legend: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_dev_curves(groups: dict[str, list[Run]], path: str, title: str,
                    colors: dict[str, str] | None = None) -> str:
    """Dev metric per epoch (mean over seeds), one panel per task plus overall."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, metric in zip(axes.flat, METRICS):
        for name, runs in groups.items():
            xs, ys = mean_curve(runs, lambda e, m=metric: _metric(e, m))
            ax.plot(xs, ys, marker="o", markersize=3, label=name, color=(colors or {}).get(name))
        ax.set_title(LABELS[metric], fontsize=10)
        _style(ax)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    return _save(fig, axes, path, title)


def _is_mix(cfg: dict, pcgrad: bool, aux: bool) -> bool:
    return (cfg.get("option") == "finetune" and cfg.get("mode") == "mix"
            and bool(cfg.get("pcgrad")) == pcgrad and bool(cfg.get("aux")) == aux)


def paired_groups(groups: dict[str, list[Run]], pcgrad: bool, aux: bool) -> dict[str, list[Run]]:
    """Plain finetune-mix and one variant of it, only at dropouts where both were run,
    so the comparison changes one thing at a time."""
    def find(want_pcgrad: bool, want_aux: bool) -> dict[str, str]:
        return {_dropout(runs[0].config): name for name, runs in groups.items()
                if _is_mix(runs[0].config, want_pcgrad, want_aux)}
    base, variant = find(False, False), find(pcgrad, aux)
    chosen = {}
    for dropout in sorted(set(base) & set(variant), key=float):
        chosen[base[dropout]] = groups[base[dropout]]
        chosen[variant[dropout]] = groups[variant[dropout]]
    return chosen


def _pairs(groups: dict[str, list[Run]]) -> list[str]:
    records = (rec for runs in groups.values() for run in runs for rec in run.epochs)
    return list(dict.fromkeys(pair for rec in records for pair in (rec.get("grad") or {})))


def _grad(epoch: dict, pair: str, key: str) -> float | None:
    return ((epoch.get("grad") or {}).get(pair) or {}).get(key)


def plot_conflicts(groups: dict[str, list[Run]], path: str,
                   colors: dict[str, str] | None = None) -> str | None:
    """Mean gradient cosine and conflict fraction per task pair over epochs."""
    pairs = _pairs(groups)
    if not pairs:
        return None
    fig, axes = plt.subplots(2, len(pairs), figsize=(3 * len(pairs) + 1, 5), squeeze=False)
    for col, pair in enumerate(pairs):
        for row, (key, label) in enumerate((("cos", "mean cosine"), ("conflict", "conflict frac"))):
            ax = axes[row][col]
            for name, runs in groups.items():
                xs, ys = mean_curve(runs, lambda e, p=pair, k=key: _grad(e, p, k))
                if xs:
                    ax.plot(xs, ys, marker="o", markersize=3, label=name,
                            color=(colors or {}).get(name))
            ax.set_title(f"{pair}: {label}", fontsize=9)
            ax.set_xlabel("epoch" if row else "")
            _style(ax)
    return _save(fig, axes, path, "Gradient conflicts between tasks")


def write_plots(groups: dict[str, list[Run]], out: str) -> list[str]:
    written = []
    # one colour per configuration across all figures, so they read together
    colors = {name: f"C{i % 10}" for i, name in enumerate(groups)}
    if groups:
        path = os.path.join(out, "methods.png")
        written.append(plot_dev_curves(groups, path, "Dev metrics by method", colors))
    for file, title, pcgrad, aux in (("pcgrad.png", "finetune-mix vs + PCGrad", True, False),
                                     ("aux.png", "finetune-mix vs + auxiliary task", False, True)):
        chosen = paired_groups(groups, pcgrad, aux)
        if chosen:
            written.append(plot_dev_curves(chosen, os.path.join(out, file), title, colors))
        else:
            _skip(out, file, "needs finetune-mix and its variant at the same dropout")
    conflicts = plot_conflicts(groups, os.path.join(out, "conflicts.png"), colors)
    if conflicts:
        written.append(conflicts)
    else:
        _skip(out, "conflicts.png", "no run has gradient diagnostics ('grad')")
    return written


def _skip(out: str, file: str, why: str) -> None:
    print(f"skipping {file}: {why}")
    stale = os.path.join(out, file)
    if os.path.isfile(stale):  # left by an earlier report; it no longer matches the table
        os.remove(stale)


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
    with open(files[0], "w", encoding="utf-8") as f:
        f.write(markdown)
    with open(files[1], "w", encoding="utf-8") as f:
        json.dump({"rows": rows}, f, indent=2)
    files += write_plots(groups, out)
    return {"table_md": markdown, "rows": rows, "files": files}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Rebuild the results table and figures from run folders.")
    parser.add_argument("runs_root", help="folder searched (recursively) for run folders")
    parser.add_argument("--out", default=None, help="output folder (default: RUNS_ROOT/report)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs_root):
        parser.error(f"{args.runs_root}: no such folder")
    result = write_report(args.runs_root, args.out)
    print(result["table_md"])
    for path in result["files"]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
