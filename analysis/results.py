"""Reading run folders, and the names that group runs into the rows of the report's Table 1.

A run folder (written by multitask_classifier.py) holds config.json (the run's settings),
metrics.jsonl (one record per epoch: train losses, dev scores, overall, gradient
statistics) and, once the run has finished, summary.json. Any folder holding the first two
counts as a run, complete or not. Runs whose configurations share a `config_name` (they
differ only in the seed, say) are grouped into one table row, ordered by `sort_key`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from engine.runfiles import (CONFIG_FILE, DIVERGED_FILE, METRICS_FILE, SUMMARY_FILE, ResultsError,
                             read_json, read_jsonl)
from engine.specs import SPECS, TASK_NAMES, canonical_tasks

METRICS = TASK_NAMES + ("overall",)
LABELS = {**{name: SPECS[name].label_text for name in TASK_NAMES}, "overall": "Overall"}


# --- naming -----------------------------------------------------------------------------

def dropout_label(cfg: dict) -> str:
    return f"{float(cfg.get('hidden_dropout_prob', 0.0)):g}"


def _method(cfg: dict) -> str:
    base = "pretrain" if cfg.get("option") == "pretrain" else "finetune"
    if base == "finetune" or cfg.get("mode") == "seq":
        base += f"-{cfg.get('mode', 'mix')}"
    return base


def task_set(cfg: dict) -> tuple[str, ...]:
    """The evaluated tasks a run trained, in canonical order (typed order never matters)."""
    return canonical_tasks(str(cfg.get("tasks") or ",".join(TASK_NAMES)).split(","))


def is_full(cfg: dict) -> bool:
    return task_set(cfg) == TASK_NAMES


def aggregator(cfg: dict) -> str:
    return str(cfg.get("aggregator") or ("pcgrad" if cfg.get("pcgrad") else "sum"))


def hand_weights(cfg: dict) -> dict[str, float]:
    """The --weight_<task> loss weights a run set away from 1."""
    found = {name: float(cfg.get(f"weight_{name}", 1.0)) for name in TASK_NAMES}
    return {name: w for name, w in found.items() if w != 1.0}


def _extras(cfg: dict) -> list[str]:
    method = aggregator(cfg)
    labels = [] if method == "sum" else ["PCGrad" if method == "pcgrad" else method]
    if cfg.get("balance", "none") != "none":
        labels.append(f"{cfg['balance']} balance")
    if hand_weights(cfg):
        labels.append("weights " + " ".join(f"{n} {w:g}" for n, w in hand_weights(cfg).items()))
    labels += ["aux"] if cfg.get("aux") else []
    # A single-task baseline (--tasks) is its own row, never averaged with the full runs.
    return labels + ([] if is_full(cfg) else ["+".join(task_set(cfg)) + " only"])


def config_name(cfg: dict) -> str:
    """Display name of a configuration, e.g. 'finetune-mix + PCGrad (0.3)'."""
    dropout = dropout_label(cfg)
    if cfg.get("option") == "pretrain":
        dropout = f"dropout {dropout}"
    return " + ".join([_method(cfg)] + _extras(cfg)) + f" ({dropout})"


def config_slug(cfg: dict) -> str:
    """Filesystem-safe name of a configuration, e.g. 'finetune-mix-pcgrad-0.3'."""
    words = [_method(cfg)] + [re.sub(r"[^a-z0-9]+", "-", e.lower()) for e in _extras(cfg)]
    return "-".join(words + [dropout_label(cfg)])


def sort_key(cfg: dict) -> tuple:
    """Table 1's row order: pretrain, finetune-seq, finetune-mix, + PCGrad (then the other
    aggregators, balancings and hand-set weights), + aux."""
    method, balance = aggregator(cfg), str(cfg.get("balance", "none"))
    return (cfg.get("option") != "pretrain", cfg.get("mode") != "seq", bool(cfg.get("aux")),
            method != "sum", method != "pcgrad", method, balance != "none", balance,
            bool(hand_weights(cfg)), float(cfg.get("hidden_dropout_prob", 0.0)))


# --- loading ----------------------------------------------------------------------------

@dataclass
class Run:
    path: str
    config: dict
    epochs: list[dict]
    summary: dict | None
    diverged: dict | None = None  # what stopped a run whose training diverged

    @property
    def complete(self) -> bool:
        return self.summary is not None

    def best(self) -> dict | None:
        """The epoch with the highest dev overall score (the first one on ties)."""
        scored = [e for e in self.epochs if e.get("overall") is not None]
        return max(scored, key=lambda e: e["overall"]) if scored else None


def metric_value(epoch: dict, metric: str) -> float | None:
    return epoch.get("overall") if metric == "overall" else epoch.get("dev", {}).get(metric)


def _read_json(path: str) -> dict | None:
    return read_json(path) if os.path.isfile(path) else None


def read_metrics(path: str) -> list[dict]:
    """Epoch records, in epoch order. metrics.jsonl is written atomically, so a line that
    does not parse, or an epoch recorded twice (two runs in one folder), is corruption:
    runfiles.ResultsError names the file and line."""
    records, lines = read_jsonl(path), {}
    for number, record in enumerate(records, 1):
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ResultsError(f"{path}, line {number}: no epoch number")
        if epoch in lines:
            raise ResultsError(f"{path}, line {number}: epoch {epoch} again (first on line "
                               f"{lines[epoch]}); a run folder holds one run")
        lines[epoch] = number
    return sorted(records, key=lambda r: r["epoch"])


def load_run(path: str) -> Run:
    metrics = os.path.join(path, METRICS_FILE)
    return Run(path=path, config=_read_json(os.path.join(path, CONFIG_FILE)) or {},
               epochs=read_metrics(metrics) if os.path.isfile(metrics) else [],
               summary=_read_json(os.path.join(path, SUMMARY_FILE)),
               diverged=_read_json(os.path.join(path, DIVERGED_FILE)))


def find_runs(root: str) -> list[Run]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if CONFIG_FILE in files and (METRICS_FILE in files or DIVERGED_FILE in files):
            found.append(load_run(folder))
    return found


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs by configuration name, in Table 1's order."""
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (sort_key(r.config), r.config.get("seed") or 0, r.path)):
        groups.setdefault(config_name(run.config), []).append(run)
    return groups
