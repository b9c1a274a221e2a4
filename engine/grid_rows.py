"""What grid.py runs: the rows of the report's Table 1 and of the methods comparison, as
trainer flags, chosen by slug or display name, or the named rows of a rows file (TOML); and
the trainer flags grid sets itself, which --extra and a row may not. Torch-free."""
from __future__ import annotations

import argparse
import re
import shlex
import tomllib

from analysis.results import config_name, config_slug
from engine.cli import SEED_RANGE, build_parser
from engine.configs import MultitaskConfig
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
              "subsample_fraction": "--subsample_fraction",
              "aux": "--aux", "lr": "--finetune_lr or --pretrain_lr", "label": "--rows",
              **{name: "--rows" for name in ("option", "mode", "pcgrad", "aggregator", "balance",
                                             "hidden_dropout_prob", "weight_sst", "weight_quora",
                                             "weight_sts")}}
# Flags that would make a grid run anything but a new training run in its own folder.
NOT_A_NEW_RUN = ("resume", "eval_only", "load")


def flag_names(words: list[str]) -> list[str]:
    """The option names a list of trainer arguments sets (--no-x sets x)."""
    return [word[2:].split("=", 1)[0].removeprefix("no-") for word in words
            if word.startswith("--")]


def check_extra(extra: str) -> None:
    """--extra may add trainer flags, never set the ones grid sets itself."""
    try:
        words = shlex.split(extra)
    except ValueError as err:
        raise ConfigError(f"--extra {extra!r}: {err}") from None
    for name in flag_names(words):
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
    """`--rows methods` (or `methods ROW...`): the methods comparison; `--rows FILE.toml`
    (or `FILE.toml ROW...`): the file's named rows; else Table 1's rows."""
    named = rows_file_argument(wanted)
    if named:
        path, chosen = named
        return select_rows(rows_file(path), " ".join(chosen) or "all")
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


# --- named rows from a file (`--rows FILE.toml`) -----------------------------------------

ROWS_SUFFIX = ".toml"
ROW_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
# What grid sets on every run, so a row may not: a row may set its method's flags, its
# own --lr (as the methods' recipe row does) and --aux. Its name is its --label.
SET_BY_GRID = ("seed", "run_dir", "epochs", "data_dir", "subsample", "subsample_fraction",
               "checkpoint", "label")


def rows_file_argument(wanted: str) -> tuple[str, list[str]] | None:
    """(FILE, the rows chosen) when --rows starts with a .toml file, else None."""
    items = split_list(wanted)
    if not items:
        return None
    if items[0].endswith(ROWS_SUFFIX):  # a path with spaces is one item of --rows A B
        return items[0], items[1:]
    first, *chosen = items[0].split()  # --rows "FILE ROW"
    return (first, chosen + items[1:]) if first.endswith(ROWS_SUFFIX) else None


def _refuse(message: str):
    raise ConfigError(message)


def explicit_flags(words: list[str]) -> dict:
    """The trainer options `words` set (name -> value), through the trainer's own parser;
    an unknown flag or a bad value is a ConfigError naming the flag (argparse's message)."""
    if {"-h", "--help"} & set(words):  # argparse would print the help and exit 0
        raise ConfigError("--help is not a training flag")
    parser = build_parser(MultitaskConfig)
    parser.error = _refuse  # not argparse's exit: the caller names the row
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(words))


def read_rows_file(path: str) -> dict:
    """name -> its flags (a string, split as a shell would, or a list of strings)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--rows {path}: file not found") from None
    except OSError as err:
        raise ConfigError(f"--rows {path}: cannot be read ({err.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--rows {path}: not valid TOML ({err})") from None
    rows = data.get("rows")
    if set(data) - {"rows"} or not isinstance(rows, dict) or not rows:
        raise ConfigError(f"--rows {path}: expected [rows.NAME] tables with flags = \"...\" "
                          f"and nothing else, got keys {sorted(data)}")
    found = {}
    for name, row in rows.items():
        where = f"--rows {path}, row {name!r}"
        if not ROW_NAME.fullmatch(name) or name == "all":
            raise ConfigError(f"{where}: a row's name names its run folders (NAME-seedN): "
                              "lowercase letters, digits, '.', '_' and '-', not 'all'")
        flags = row.get("flags") if isinstance(row, dict) else None
        if not isinstance(row, dict) or set(row) != {"flags"} or not (
                isinstance(flags, str) or isinstance(flags, list)
                and all(isinstance(w, str) for w in flags)):
            raise ConfigError(f"{where}: expected flags = \"--option value ...\" alone")
        try:
            found[name] = shlex.split(flags) if isinstance(flags, str) else list(flags)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    return found


def rows_file(path: str) -> list[dict]:
    """The rows of a rows file, each checked before any run starts (see check_row)."""
    return [check_row(path, name, words) for name, words in read_rows_file(path).items()]


def check_row(path: str, name: str, words: list[str]) -> dict:
    """A named row: its flags parsed and checked as the trainer would (unknown flag, bad
    value), none grid sets itself, none meant for another kind of run."""
    where = f"--rows {path}, row {name!r}"
    try:
        given = explicit_flags(words)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    for flag in flag_names(words):
        if flag in SET_BY_GRID:
            use = "it is the row's name" if flag == "label" else f"use {GRID_FLAGS[flag]}"
            raise ConfigError(f"{where} sets --{flag}, which grid sets itself for every "
                              f"run ({use})")
        if flag in NOT_A_NEW_RUN:
            raise ConfigError(f"{where} sets --{flag}: each grid run is a new training run "
                              "in its own folder")
    try:
        cfg = MultitaskConfig(**given)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return {"label": name, "option": cfg.option, "flags": words, "sets": sorted(given),
            "file": path}


def check_named_row(row: dict, extra: list[str], argv: list[str], parse) -> None:
    """A named row with grid's own flags and --extra: no flag set by both the row and
    --extra (the later would win unseen), and the whole as the trainer parses it
    (`parse`), or an error naming the row."""
    where = f"--rows {row['file']}, row {row['label']!r}"
    both = sorted(set(flag_names(row["flags"])) & set(flag_names(extra)))
    if both:
        raise ConfigError(f"{where} sets {', '.join('--' + f for f in both)}, which --extra "
                          "sets too")
    try:
        explicit_flags(argv)
        parse(argv)
    except ConfigError as err:
        raise ConfigError(f"{where}, with grid's flags: {err}") from None
