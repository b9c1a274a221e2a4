"""Ablations: named rows of runs (grid.py --rows, or any folders named `<row>-seed<N>`),
each row's dev scores and its difference from a base row, paired by seed.

    python report.py RUNS_ROOT --ablation_base base

Rows are read from the run folders' names, not from their configs: an ablation varies any
setting (an encoding, a loss, a schedule), and the row name is what the experimenter called
it. Each run counts at its best epoch by the plain overall mean (as in table.md); the
paired test is compare.paired_difference's (t-test and bootstrap interval over seeds).
Beside the report's plain mean of the three metrics, the course leaderboard's overall
(SST + Quora + (STS + 1) / 2) / 3 (STS's Pearson mapped to [0, 1]). Torch-free.
"""
from __future__ import annotations

import os
import re
import statistics

from analysis.compare import TEST_TEXT, paired_difference
from analysis.results import LABELS, METRICS, Run, metric_value
from engine.runfiles import ResultsError

SEEDED = re.compile(r"^(?P<row>.+)-seed(?P<seed>\d+)$")
LEADERBOARD = "leaderboard"
LEADERBOARD_TEXT = "(SST + Quora + (STS + 1) / 2) / 3"
COLUMNS = METRICS + (LEADERBOARD,)


def leaderboard_overall(dev: dict) -> float | None:
    """The CS224N leaderboard's overall score; None unless all three tasks are scored."""
    if not all(isinstance(dev.get(k), (int, float)) for k in ("sst", "quora", "sts")):
        return None
    return (dev["sst"] + dev["quora"] + (dev["sts"] + 1) / 2) / 3


def _value(epoch: dict, column: str) -> float | None:
    return leaderboard_overall(epoch.get("dev", {})) if column == LEADERBOARD else metric_value(epoch, column)


def rows_by_name(runs: list[Run]) -> dict[str, dict[int, Run]]:
    """Complete runs by row name and seed (from `<row>-seed<N>` folder names); other
    folders are left out."""
    rows: dict[str, dict[int, Run]] = {}
    for run in runs:
        found = SEEDED.match(os.path.basename(os.path.normpath(run.path)))
        if found and run.complete and run.best() is not None:
            rows.setdefault(found["row"], {})[int(found["seed"])] = run
    return rows


def ablation(runs: list[Run], base: str) -> dict:
    """Every row's mean and sample std per column, and its paired difference from `base`."""
    rows = rows_by_name(runs)
    if base not in rows:
        known = ", ".join(sorted(rows)) or "none"
        raise ResultsError(f"--ablation_base {base}: no complete run folder named "
                           f"'{base}-seed<N>' (rows found: {known})")
    scores = {name: {c: {s: v for s, r in seeds.items()
                         if (v := _value(r.best(), c)) is not None} for c in COLUMNS}
              for name, seeds in rows.items()}
    entries = []
    for name in [base] + sorted(n for n in rows if n != base):
        entry = {"name": name, "seeds": sorted(rows[name]), "mean": {}, "std": {}, "diff": {}}
        for column, values in scores[name].items():
            if values:
                entry["mean"][column] = statistics.fmean(values.values())
                entry["std"][column] = statistics.stdev(values.values()) if len(values) > 1 else None
            if name != base:
                entry["diff"][column] = paired_difference(values, scores[base][column])
        entries.append(entry)
    test = f"paired by seed: mean difference from the base row '{base}'; " + TEST_TEXT.split("; ", 1)[1]
    return {"base": base, "test": test,
            "leaderboard": LEADERBOARD_TEXT, "columns": list(COLUMNS), "rows": entries}


def _cell(entry: dict, column: str) -> str:
    if column not in entry["mean"]:
        return "–"
    std = entry["std"][column]
    return f"{entry['mean'][column]:.3f}" + ("" if std is None else f" ± {std:.3f}")


def _diff(diff: dict | None) -> str:
    if not diff or diff["mean"] is None:
        return "n/a"
    if diff["ci"] is None:
        return f"{diff['mean']:+.3f} (1 seed)"
    low, high = diff["ci"]
    return f"{diff['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def format_ablation(result: dict) -> str:
    columns = result["columns"]
    labels = " | ".join(LABELS.get(c, "Leaderboard") for c in columns)
    head = "|---|---:|" + "---:|" * len(columns)
    lines = [f"# Ablation against '{result['base']}'", "",
             "Complete runs, each at its best epoch by the plain overall mean. Overall: the "
             f"report's plain mean of the three; Leaderboard: {result['leaderboard']}.", "",
             "## Dev scores (mean ± sample std over seeds)", "",
             f"| Row | seeds | {labels} |", head]
    lines += [f"| {e['name']} | {len(e['seeds'])} | " + " | ".join(_cell(e, c) for c in columns) + " |"
              for e in result["rows"]]
    lines += ["", f"## Difference from '{result['base']}', paired by seed", "",
              f"Test: {result['test']}.", "", "Cells: mean difference [bootstrap 95% interval].", "",
              f"| Row | paired seeds | {labels} |", head]
    for e in result["rows"][1:]:
        paired = max((e["diff"][c]["n"] for c in columns if c in e["diff"]), default=0)
        lines.append(f"| {e['name']} | {paired} | " + " | ".join(_diff(e["diff"].get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
