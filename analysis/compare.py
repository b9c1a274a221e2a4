"""The comparison of gradient-combination methods (`grid.py --rows methods`): each method's
dev scores, its difference from plain finetune-mix paired by seed, and how stable it trains.

Written by report.py as comparison.md / comparison.json / comparison.png when the runs hold
more than one method: finetune-mix rows (every task, no auxiliary task) that differ in
aggregator, loss balancing or hand-set loss weights. Only complete runs count; each run is
scored at its best epoch by overall, as in table.md. Torch-free.

The test: per metric, the differences d_i = method - base over the seeds both have; a
two-sided paired t-test (t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of freedom) and a
percentile bootstrap 95% interval of mean(d) (10,000 resamples of the seeds, generator
seeded with 0, so the report is deterministic). A difference is "within noise" when the
interval contains 0 or p >= 0.05; with fewer than 2 paired seeds it is "n/a".
"""
from __future__ import annotations

import math
import statistics

import numpy as np

from analysis.results import (LABELS, METRICS, Run, aggregator, dropout_label, hand_weights,
                              is_full, metric_value, settings)

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
TEST_TEXT = ("paired by seed: mean difference from finetune-mix (sum) at the same dropout; "
             "two-sided paired t-test over the seeds both have (n - 1 degrees of freedom) and "
             f"a percentile bootstrap 95% interval of the mean difference ({BOOTSTRAP_RESAMPLES} "
             f"resamples, seed {BOOTSTRAP_SEED}); 'within noise' when the interval contains 0 "
             f"or p >= {ALPHA}; 'n/a' with fewer than 2 paired seeds")


# --- statistics -------------------------------------------------------------------------

def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with integer df >= 1 (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:  # A = 2/pi (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...))
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        inside = theta + (s * math.cos(theta) * total if df > 1 else 0.0)
        area = 2 / math.pi * inside
    else:  # A = sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        area = s * total
    return min(1.0, max(0.0, 1.0 - area))


def paired_t(diffs: list[float]) -> tuple[float, float]:
    """(t, two-sided p) of the paired differences; needs at least 2."""
    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, t_two_sided_p(t, n - 1)


def bootstrap_interval(diffs: list[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean difference (seeded: deterministic)."""
    values = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(low), float(high)


def paired_difference(method: dict[int, float], base: dict[int, float]) -> dict:
    """Seed -> score of a method and of the base: the paired test of their difference."""
    seeds = sorted(set(method) & set(base))
    diffs = [method[s] - base[s] for s in seeds]
    result = {"seeds": seeds, "n": len(seeds), "diffs": diffs,
              "mean": statistics.fmean(diffs) if diffs else None,
              "t": None, "df": None, "p": None, "ci": None, "verdict": "n/a"}
    if len(diffs) >= 2:
        t, p = paired_t(diffs)
        low, high = bootstrap_interval(diffs)
        noise = low <= 0 <= high or p >= ALPHA
        result.update(t=t, df=len(diffs) - 1, p=p, ci=[low, high],
                      verdict="within noise" if noise else ("better" if result["mean"] > 0 else "worse"))
    return result


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def swing(run: Run, metric: str) -> float | None:
    """Mean absolute change of a dev metric between consecutive epochs of one run."""
    values = [v for v in (metric_value(e, metric) for e in run.epochs) if v is not None]
    steps = [abs(b - a) for a, b in zip(values, values[1:])]
    return statistics.fmean(steps) if steps else None


def stability(runs: list[Run], metric: str) -> dict:
    """Spread over seeds of the final- and best-epoch score, and the epoch-to-epoch swing
    averaged over the seeds."""
    finals = [metric_value(r.epochs[-1], metric) for r in runs if r.epochs]
    bests = [metric_value(r.best(), metric) for r in runs if r.best() is not None]
    swings = [s for s in (swing(r, metric) for r in runs) if s is not None]
    return {"std_final": _std([v for v in finals if v is not None]),
            "std_best": _std([v for v in bests if v is not None]),
            "swing": statistics.fmean(swings) if swings else None}


# --- which runs ---------------------------------------------------------------------------

def method_key(cfg: dict) -> tuple:
    """What the comparison varies: aggregator, loss balancing, hand-set weights (and lr)."""
    return (aggregator(cfg), settings(cfg).balance, tuple(sorted(hand_weights(cfg).items())))


def is_base(cfg: dict) -> bool:
    """Plain finetune-mix: the sum of the task losses, no balancing, no hand-set weights."""
    return method_key(cfg) == ("sum", "none", ())


def _candidate(cfg: dict) -> bool:
    typed = settings(cfg)
    return typed.option == "finetune" and typed.mode == "mix" and is_full(typed) and not typed.aux


def method_groups(groups: dict[str, list[Run]]) -> dict[str, list[Run]]:
    """The finetune-mix groups that take part, if they hold more than one method."""
    chosen = {name: runs for name, runs in groups.items() if _candidate(runs[0].config)}
    if len({method_key(runs[0].config) for runs in chosen.values()}) < 2:
        return {}
    return chosen


def _scores(runs: list[Run], metric: str) -> dict[int, float]:
    found = {}
    for run in runs:
        best = run.best()
        value = metric_value(best, metric) if best is not None else None
        if value is not None:
            found[run.config.get("seed")] = value
    return found


def compare(groups: dict[str, list[Run]]) -> dict:
    """Every method's scores, paired difference from the base and stability (see the module
    docstring); {} when the runs hold fewer than two methods."""
    chosen = method_groups(groups)
    if not chosen:
        return {}
    complete = {name: [r for r in runs if r.complete] for name, runs in chosen.items()}
    bases = {dropout_label(runs[0].config): name for name, runs in chosen.items()
             if is_base(runs[0].config)}
    methods = []
    for name, runs in chosen.items():
        done = complete[name]
        dropout = dropout_label(runs[0].config)
        base = bases.get(dropout)
        key = method_key(runs[0].config)
        entry = {"name": name, "dropout": dropout, "base": base, "is_base": name == base,
                 "aggregator": key[0], "balance": key[1], "weights": dict(key[2]),
                 "seeds": [r.config.get("seed") for r in done], "n": len(done),
                 "left_out": {"diverged": sum(1 for r in runs if not r.complete and r.diverged),
                              "incomplete": sum(1 for r in runs if not r.complete and not r.diverged)},
                 "mean": {}, "std": {}, "diff": {}, "stability": {}}
        for metric in METRICS:
            scores = _scores(done, metric)
            if scores:
                entry["mean"][metric] = statistics.fmean(scores.values())
                entry["std"][metric] = _std(list(scores.values()))
            if base is not None and name != base:
                entry["diff"][metric] = paired_difference(scores, _scores(complete[base], metric))
            entry["stability"][metric] = stability(done, metric)
        methods.append(entry)
    return {"test": TEST_TEXT, "metrics": list(METRICS), "methods": methods}


# --- markdown -----------------------------------------------------------------------------

def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_std(entry: dict, metric: str) -> str:
    if metric not in entry["mean"]:
        return "–"
    std = entry["std"][metric]
    return _num(entry["mean"][metric]) + ("" if std is None else f" ± {std:.3f}")


def _diff_cell(diff: dict | None) -> str:
    if not diff or diff["mean"] is None:
        return "n/a"
    text = f"{diff['mean']:+.3f}"
    if diff["ci"] is None:
        return text + f" (n/a, {diff['n']} seed)"
    low, high = diff["ci"]
    return text + f" [{low:+.3f}, {high:+.3f}] p={diff['p']:.2g} {diff['verdict']}"


def _stability_cell(stab: dict) -> str:
    return f"{_num(stab['swing'])} ({_num(stab['std_final'])} / {_num(stab['std_best'])})"


def _left_out(entry: dict) -> str:
    parts = [f"{n} {kind}" for kind, n in entry["left_out"].items() if n]
    return f" (left out: {', '.join(parts)})" if parts else ""


def format_comparison(result: dict) -> str:
    metrics = result["metrics"]
    labels = " | ".join(LABELS[m] for m in metrics)
    methods = result["methods"]
    lines = ["# Comparison of gradient-combination methods", "",
             "Complete runs only, each at its best epoch by overall (as in table.md).", "",
             "## Dev scores (mean ± sample std over seeds)", "",
             f"| Method | seeds | {labels} |", "|---|---:|" + "---:|" * len(metrics)]
    for e in methods:
        lines.append(f"| {e['name']}{_left_out(e)} | {e['n']} | "
                     + " | ".join(_mean_std(e, m) for m in metrics) + " |")
    lines += ["", "## Difference from finetune-mix (sum), paired by seed", "",
              f"Test: {result['test']}.", "",
              "Cells: mean difference [bootstrap 95% interval] t-test p, verdict.", "",
              f"| Method | paired seeds | {labels} |", "|---|---:|" + "---:|" * len(metrics)]
    for e in methods:
        if e["is_base"]:
            continue
        if e["base"] is None:
            lines.append(f"| {e['name']} | 0 | " + " | ".join(
                "n/a (no finetune-mix at this dropout)" for _ in metrics) + " |")
            continue
        paired = max((e["diff"][m]["n"] for m in metrics), default=0)
        lines.append(f"| {e['name']} | {paired} | "
                     + " | ".join(_diff_cell(e["diff"].get(m)) for m in metrics) + " |")
    lines += ["", "## Stability", "",
              "Cells: swing (std final / std best): the mean absolute change of the dev "
              "metric between consecutive epochs, averaged over seeds; the sample std over "
              "seeds of the final-epoch and of the best-epoch dev metric. Smaller is steadier.",
              "", f"| Method | {labels} |", "|---|" + "---:|" * len(metrics)]
    for e in methods:
        lines.append(f"| {e['name']} | "
                     + " | ".join(_stability_cell(e["stability"][m]) for m in metrics) + " |")
    lines += _pcgrad_side_by_side(methods, metrics)
    return "\n".join(lines) + "\n"


def _pcgrad_side_by_side(methods: list[dict], metrics: list[str]) -> list[str]:
    """Gradient surgery's stability claim: PCGrad and its base at each dropout, side by side."""
    lines = []
    for e in methods:
        if (e["aggregator"], e["balance"], e["weights"]) != ("pcgrad", "none", {}) or not e["base"]:
            continue
        base = next(b for b in methods if b["name"] == e["base"])
        lines += ["", f"### {e['name']} against {base['name']}", "",
                  "| Measure | Metric | sum | PCGrad | PCGrad - sum |", "|---|---|---:|---:|---:|"]
        for key, what in (("swing", "epoch-to-epoch swing"), ("std_final", "std final epoch"),
                          ("std_best", "std best epoch")):
            for m in metrics:
                a, b = base["stability"][m][key], e["stability"][m][key]
                delta = None if a is None or b is None else b - a
                lines.append(f"| {what} | {LABELS[m]} | {_num(a)} | {_num(b)} | "
                             + ("–" if delta is None else f"{delta:+.3f}") + " |")
    return lines
