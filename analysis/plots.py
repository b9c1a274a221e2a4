"""The figures of a results report (the report's Figures 4-8): dev metrics per epoch by
method, finetune-mix against its PCGrad and auxiliary-task variants, and the gradient
conflicts between tasks over training; per run and per compared method, the task weights
the gradient combination applied over the steps (steps.jsonl). Built from run folders by
report.py.
"""
from __future__ import annotations

import os
import statistics
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only: this also runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.results import (LABELS, METRICS, Run, config_name, dropout_label,  # noqa: E402
                              hand_weights, is_full, metric_value, settings, step_weights)

DPI = 100
WEIGHTS_FILE = "weights.png"  # one per run, in REPORT/runs/<the run's folder below the root>/
RUNS_FIGURES = "runs"


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


def _curves(ax, groups: dict[str, list[Run]], value: Callable[[dict], float | None],
            colors: dict[str, str] | None) -> None:
    for name, runs in groups.items():
        xs, ys = mean_curve(runs, value)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=name, color=(colors or {}).get(name))


def plot_dev_curves(groups: dict[str, list[Run]], path: str, title: str,
                    colors: dict[str, str] | None = None) -> str:
    """Dev metric per epoch (mean over seeds), one panel per task plus overall."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, metric in zip(axes.flat, METRICS):
        _curves(ax, groups, lambda e, m=metric: metric_value(e, m), colors)
        ax.set_title(LABELS[metric], fontsize=10)
        _style(ax)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    return _save(fig, axes, path, title)


def _is_mix(cfg: dict, pcgrad: bool, aux: bool) -> bool:
    """finetune-mix on every task, summed (pcgrad: PCGrad) with no loss balancing and no
    hand-set weights: a --tasks subset or an MGDA run is never a baseline of these figures."""
    typed = settings(cfg)
    return (typed.option == "finetune" and typed.mode == "mix" and is_full(typed)
            and typed.aggregator == ("pcgrad" if pcgrad else "sum")
            and typed.balance == "none" and not hand_weights(typed) and bool(typed.aux) == aux)


def paired_groups(groups: dict[str, list[Run]], pcgrad: bool, aux: bool) -> dict[str, list[Run]]:
    """Plain finetune-mix and one variant of it, only at dropouts where both were run,
    so the comparison changes one thing at a time."""
    def find(want_pcgrad: bool, want_aux: bool) -> dict[str, str]:
        return {dropout_label(runs[0].config): name for name, runs in groups.items()
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
            _curves(ax, groups, lambda e, p=pair, k=key: _grad(e, p, k), colors)
            ax.set_title(f"{pair}: {label}", fontsize=9)
            ax.set_xlabel("epoch" if row else "")
            _style(ax)
    return _save(fig, axes, path, "Gradient conflicts between tasks")


def plot_grad_norms(groups: dict[str, list[Run]], path: str,
                    colors: dict[str, str] | None = None) -> str | None:
    """Mean encoder gradient norm per task over epochs: a task whose gradient is much
    smaller than the others' gets a small share of each (Adam-normalised) update."""
    records = (rec for runs in groups.values() for run in runs for rec in run.epochs)
    tasks = list(dict.fromkeys(t for rec in records for t in (rec.get("grad_norm") or {})))
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(3 * len(tasks) + 1, 3), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0][col]
        _curves(ax, groups, lambda e, t=task: (e.get("grad_norm") or {}).get(t), colors)
        ax.set_title(f"{task}: gradient norm", fontsize=9)
        ax.set_xlabel("epoch")
        _style(ax)
    return _save(fig, axes, path, "Encoder gradient norm per task")


def plot_forest(comparison: dict, path: str) -> str | None:
    """Per metric, each method's mean paired difference from finetune-mix (sum) with its
    bootstrap 95% interval; hollow markers: within noise or n/a. None when nothing pairs."""
    methods = [e for e in comparison.get("methods", []) if e["diff"]
               and any(d["mean"] is not None for d in e["diff"].values())]
    if not methods:
        return None
    metrics = comparison["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 2, 0.35 * len(methods) + 1.6),
                             sharey=True, squeeze=False)
    ys = list(range(len(methods)))[::-1]
    for ax, metric in zip(axes[0], metrics):
        for y, entry in zip(ys, methods):
            diff = entry["diff"].get(metric)
            if not diff or diff["mean"] is None:
                continue
            mean = diff["mean"]
            err = None
            if diff["ci"] is not None:
                low, high = diff["ci"]
                err = [[max(0.0, mean - low)], [max(0.0, high - mean)]]
            solid = diff["verdict"] in ("better", "worse")
            ax.errorbar([mean], [y], xerr=err, fmt="o", color="C0" if solid else "C7",
                        markerfacecolor="C0" if solid else "white", capsize=3, markersize=5)
        ax.axvline(0.0, color="k", linewidth=0.8, linestyle="--")
        ax.set_title(LABELS[metric], fontsize=10)
        ax.set_xlabel("difference from finetune-mix")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels([e["name"] for e in methods], fontsize=8)
    fig.suptitle("Paired difference from finetune-mix (sum), bootstrap 95% interval; "
                 "filled: outside noise", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


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
            remove_stale(out, file, "needs finetune-mix and its variant at the same dropout")
    for file, plot, key in (("conflicts.png", plot_conflicts, "grad"),
                            ("grad_norms.png", plot_grad_norms, "grad_norm")):
        path = plot(groups, os.path.join(out, file), colors)
        if path:
            written.append(path)
        else:
            remove_stale(out, file, f"no run has gradient diagnostics ('{key}')")
    return written


def remove_stale(out: str, file: str, why: str = "") -> None:
    """A figure not made this time: say why, and remove the one an earlier report left."""
    if why:
        print(f"skipping {file}: {why}")
    stale = os.path.join(out, file)
    if os.path.isfile(stale):  # left by an earlier report; it no longer matches the table
        os.remove(stale)


# --- task weights over steps (steps.jsonl) ----------------------------------------------

def weight_series(runs: list[Run]) -> dict[str, tuple[list[int], list[float]]]:
    """Task -> (steps, mean weight over the runs logging that step)."""
    found: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for step, weights in step_weights(run):
            for task, weight in weights.items():
                found.setdefault(task, {}).setdefault(step, []).append(weight)
    return {task: (sorted(by_step), [statistics.fmean(by_step[s]) for s in sorted(by_step)])
            for task, by_step in found.items()}


def _weight_lines(ax, series: dict, colors: dict[str, str]) -> None:
    for task, (steps, values) in series.items():
        ax.plot(steps, values, marker="o", markersize=2, linewidth=1, label=task,
                color=colors.setdefault(task, f"C{len(colors) % 10}"))
    ax.set_xlabel("step")
    _style(ax)


def plot_weights(series: dict, path: str, title: str) -> str:
    """One run's task weights over the steps, one line per task."""
    fig, axes = plt.subplots(1, 1, figsize=(6, 3.5), squeeze=False)
    _weight_lines(axes[0][0], series, {})
    axes[0][0].set_ylabel("task weight")
    return _save(fig, axes, path, title)


def _no_weights_note(runs: list[Run]) -> str:
    if not runs:
        return "no complete run"
    typed = settings(runs[0].config)
    plain = typed.aggregator == "sum" and typed.balance == "none"
    return "no weights logged" + ("\n(plain sum: every weight is 1)" if plain else "")


def plot_method_weights(methods: dict[str, list[Run]], path: str) -> str | None:
    """One panel per method (same y scale): the task weights over the steps, mean over its
    runs; None when no method's runs logged any."""
    series = {name: weight_series(runs) for name, runs in methods.items()}
    if not any(series.values()):
        return None
    cols = min(len(methods), 3)
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 2.8 * rows), sharey=True,
                             squeeze=False)
    colors: dict[str, str] = {}
    for ax, (name, runs) in zip(axes.flat, methods.items()):
        ax.set_title(name, fontsize=9)
        if series[name]:
            _weight_lines(ax, series[name], colors)
        else:
            ax.text(0.5, 0.5, _no_weights_note(runs), ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    return _save(fig, axes, path, "Task weights of the gradient combination (mean over seeds)")


def write_weight_plots(runs: list[Run], root: str, out: str) -> list[str]:
    """REPORT/runs/<run>/weights.png for each run whose steps.jsonl holds task weights;
    such a figure an earlier report left for a run that no longer has weights is removed."""
    written = []
    for run in runs:
        series = weight_series([run])
        if not series:
            continue
        folder = os.path.normpath(os.path.join(out, RUNS_FIGURES, os.path.relpath(run.path, root)))
        os.makedirs(folder, exist_ok=True)
        title = f"Task weights: {os.path.relpath(run.path, root)} ({config_name(run.config)})"
        written.append(plot_weights(series, os.path.join(folder, WEIGHTS_FILE), title))
    for folder, _, files in os.walk(os.path.join(out, RUNS_FIGURES)):
        stale = os.path.join(folder, WEIGHTS_FILE)
        if WEIGHTS_FILE in files and stale not in written:
            os.remove(stale)
    return written
