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

from engine.configs import MultitaskConfig
from engine.runfiles import (CONFIG_FILE, DIVERGED_FILE, METRICS_FILE, STEPS_FILE, SUMMARY_FILE,
                             ResultsError, read_json, read_jsonl)
from engine.specs import SPECS, TASK_NAMES

METRICS = TASK_NAMES + ("overall",)
LABELS = {**{name: SPECS[name].label_text for name in TASK_NAMES}, "overall": "Overall"}


# --- naming -----------------------------------------------------------------------------

def settings(cfg: dict | MultitaskConfig) -> MultitaskConfig:
    """A saved config.json (or a grid row's flags) read through the trainer's config class:
    a setting it does not name has the trainer's own default, never a copy of it."""
    return cfg if isinstance(cfg, MultitaskConfig) else MultitaskConfig.from_saved(cfg)


def dropout_label(cfg: dict | MultitaskConfig) -> str:
    return f"{settings(cfg).hidden_dropout_prob:g}"


def _method(cfg: MultitaskConfig) -> str:
    base = "pretrain" if cfg.option == "pretrain" else "finetune"
    if base == "finetune" or cfg.mode == "seq":
        base += f"-{cfg.mode}"
    return base


def task_set(cfg: dict | MultitaskConfig) -> tuple[str, ...]:
    """The evaluated tasks a run trained, in canonical order (typed order never matters)."""
    return settings(cfg).task_names


def is_full(cfg: dict | MultitaskConfig) -> bool:
    return task_set(cfg) == TASK_NAMES


def aggregator(cfg: dict | MultitaskConfig) -> str:
    return settings(cfg).aggregator


def hand_weights(cfg: dict | MultitaskConfig) -> dict[str, float]:
    """The --weight_<task> loss weights a run set away from 1."""
    found = {name: settings(cfg).weight(name) for name in TASK_NAMES}
    return {name: w for name, w in found.items() if w != 1.0}


def _extras(cfg: MultitaskConfig) -> list[str]:
    method = cfg.aggregator
    labels = [] if method == "sum" else ["PCGrad" if method == "pcgrad" else method]
    labels += [f"smoothed {cfg.smooth_weights:g}"] if cfg.smooth_weights else []
    if cfg.balance != "none":
        labels.append(f"{cfg.balance} balance")
    if hand_weights(cfg):
        labels.append("weights " + " ".join(f"{n} {w:g}" for n, w in hand_weights(cfg).items()))
    labels += ["aux"] if cfg.aux else []
    if cfg.sampling != "cycle":  # a sampled mix is its own row
        labels.append("annealed sampling" if cfg.sampling == "annealed"
                      else f"T={cfg.sampling_temperature} sampling")
    labels += ["frozen word emb."] if cfg.freeze_word_embeddings else []
    labels += _loss_labels(cfg)
    # A single-task baseline (--tasks) is its own row, never averaged with the full runs.
    return labels + ([] if is_full(cfg) else ["+".join(task_set(cfg)) + " only"])


def _loss_labels(cfg: MultitaskConfig) -> list[str]:
    """--rdrop, --sts_loss, --label_smoothing, --layer_decay away from their defaults: such
    a run is a row of its own, never averaged with the plain one."""
    labels = [f"R-Drop {cfg.rdrop:g} ({'+'.join(cfg.rdrop_task_names)})"] if cfg.rdrop else []
    labels += [f"{cfg.sts_loss} STS loss"] if cfg.sts_loss != "mse" else []
    if cfg.label_smoothing:
        labels.append(f"label smoothing {cfg.label_smoothing:g} ({'+'.join(cfg.smoothed_task_names)})")
    return labels + ([f"layer decay {cfg.layer_decay:g}"] if cfg.layer_decay != 1.0 else [])


def config_name(cfg: dict | MultitaskConfig) -> str:
    """Display name of a configuration, e.g. 'finetune-mix + PCGrad (0.3)'; a run's
    --label (a named grid row's name) when it has one."""
    cfg = settings(cfg)
    if cfg.label:
        return cfg.label
    dropout = dropout_label(cfg)
    if cfg.option == "pretrain":
        dropout = f"dropout {dropout}"
    return " + ".join([_method(cfg)] + _extras(cfg)) + f" ({dropout})"


def config_slug(cfg: dict | MultitaskConfig) -> str:
    """Filesystem-safe name of a configuration, e.g. 'finetune-mix-pcgrad-0.3'."""
    cfg = settings(cfg)
    if cfg.label:
        return re.sub(r"[^a-z0-9._]+", "-", cfg.label.lower()).strip("-") or "label"
    words = [_method(cfg)] + [re.sub(r"[^a-z0-9]+", "-", e.lower()).strip("-") for e in _extras(cfg)]
    return "-".join(words + [dropout_label(cfg)])


def sort_key(cfg: dict | MultitaskConfig) -> tuple:
    """Table 1's row order: pretrain, finetune-seq, finetune-mix, + PCGrad (then the other
    aggregators, balancings and hand-set weights), + aux; a frozen word embedding after
    its unfrozen counterpart."""
    cfg = settings(cfg)
    method, balance = cfg.aggregator, cfg.balance
    return (cfg.option != "pretrain", cfg.mode != "seq", bool(cfg.aux),
            method != "sum", method != "pcgrad", method, balance != "none", balance,
            bool(hand_weights(cfg)), cfg.freeze_word_embeddings, cfg.hidden_dropout_prob,
            cfg.label)


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


def step_weights(run: Run) -> list[tuple[int, dict[str, float]]]:
    """(step, task -> mean weight) of each steps.jsonl record that has task weights (the
    combination's, steplog.py); none for a run without the file or without combined steps."""
    path = os.path.join(run.path, STEPS_FILE)
    if not os.path.isfile(path):
        return []
    return [(r["step"], r["weights"]) for r in read_jsonl(path)
            if isinstance(r.get("step"), int) and isinstance(r.get("weights"), dict)]


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
