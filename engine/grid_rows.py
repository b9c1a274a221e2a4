"""What grid.py runs: the rows of the report's Table 1 and of the methods comparison, as
trainer flags, chosen by slug or display name; and the trainer flags grid sets itself, which
--extra may not. Torch-free."""
from __future__ import annotations

import re
import shlex

from analysis.results import config_name, config_slug
from engine.cli import SEED_RANGE
from engine.errors import ConfigError
from engine.names import AGGREGATORS, BALANCERS


def split_list(text: str, sep: str = r"[,\n]") -> list[str]:
    return [item.strip() for item in re.split(sep, text) if item.strip()]


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in split_list(text, r"[,\s]+"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise ConfigError(f"--seeds: {item!r} is not an integer") from None
        if not SEED_RANGE[0] <= seeds[-1] < SEED_RANGE[1]:
            raise ConfigError(f"--seeds: {item} is outside [{SEED_RANGE[0]}, {SEED_RANGE[1]})")
    return seeds


# Every trainer flag trainer_argv passes, for some row or option, and the grid option
# that sets it: --extra setting one would run every row, or every seed, the same.
GRID_FLAGS = {"seed": "--seeds", "run_dir": "--runs_dir", "epochs": "--epochs",
              "data_dir": "--data_dir", "subsample": "--subsample", "checkpoint": "--checkpoint",
              "aux": "--aux", "lr": "--finetune_lr or --pretrain_lr",
              **{name: "--rows" for name in ("option", "mode", "pcgrad", "aggregator", "balance",
                                             "hidden_dropout_prob", "weight_sst", "weight_quora",
                                             "weight_sts")}}
# Flags that would make a grid run anything but a new training run in its own folder.
NOT_A_NEW_RUN = ("resume", "eval_only", "load")


def check_extra(extra: str) -> None:
    """--extra may add trainer flags, never set the ones grid sets itself."""
    try:
        words = shlex.split(extra)
    except ValueError as err:
        raise ConfigError(f"--extra {extra!r}: {err}") from None
    for word in words:
        name = word[2:].split("=", 1)[0].removeprefix("no-") if word.startswith("--") else ""
        if name in GRID_FLAGS:
            raise ConfigError(f"--extra sets --{name}, which grid sets itself for every run "
                              f"(use {GRID_FLAGS[name]})")
        if name in NOT_A_NEW_RUN:
            raise ConfigError(f"--extra sets --{name}: each grid run is a new training run "
                              "in its own folder")


def table1_rows(aux_path: str) -> list[dict]:
    """The report's Table 1: (option, mode, pcgrad, aux, dropout) per row."""
    def row(option: str, mode: str, dropout: float, pcgrad: bool = False, aux: bool = False):
        return {"option": option, "mode": mode, "pcgrad": pcgrad,
                "aux": aux_path if aux else "", "hidden_dropout_prob": dropout}
    return ([row("pretrain", "mix", 0.3), row("finetune", "seq", 0.3)]
            + [row("finetune", "mix", p) for p in (0.3, 0.5)]
            + [row("finetune", "mix", p, pcgrad=True) for p in (0.3, 0.5)]
            + [row("finetune", "mix", p, aux=True) for p in (0.3, 0.5)])


# The comparison of gradient-combination methods (`--rows methods`): finetune-mix with each
# aggregator, each loss balancing, and the hand-tuned recipe's loss weights and lr.
AGGREGATOR_ROWS = AGGREGATORS
BALANCE_ROWS = tuple(b for b in BALANCERS if b != "none")
RECIPE = {"weight_quora": 2.0, "weight_sts": 0.5, "lr": 8e-5}


def methods_rows(dropout: float = 0.3) -> list[dict]:
    def row(**changes):
        return {"option": "finetune", "mode": "mix", "pcgrad": False, "aux": "",
                "hidden_dropout_prob": dropout, "aggregator": "sum", "balance": "none", **changes}
    return ([row(aggregator=a, pcgrad=a == "pcgrad") for a in AGGREGATOR_ROWS]
            + [row(balance=b) for b in BALANCE_ROWS] + [row(**RECIPE)])


def grid_rows(wanted: str, aux_path: str) -> list[dict]:
    """`--rows methods` (or `methods ROW...`): the methods comparison; else Table 1's rows."""
    names = split_list(wanted.lower(), r"[,\s]+")
    if names[:1] == ["methods"]:
        return select_rows(methods_rows(), " ".join(names[1:]) or "all")
    return select_rows(table1_rows(aux_path), wanted)


def select_rows(rows: list[dict], wanted: str) -> list[dict]:
    """Rows named in `wanted` (slugs or display names, case-insensitive), in table order."""
    known = {config_slug(r).lower(): r for r in rows}
    known.update({config_name(r).lower(): r for r in rows})
    names = []
    for item in split_list(wanted.lower()):
        # "a b" is one display name if known, else space-separated slugs
        names += [item] if item in known else item.split()
    if names in ([], ["all"]):
        return rows
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--rows: unknown rows {unknown}; choose from: "
                         + ", ".join(config_slug(r) for r in rows))
    chosen = [id(known[n]) for n in names]
    return [r for r in rows if id(r) in chosen]
