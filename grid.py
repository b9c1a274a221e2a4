"""Runs a grid of configurations (by default the 8 rows of the report's Table 1), one run
folder per configuration x seed, then writes the table and figures with report.py.

    python grid.py [--rows all] [--seeds 0 1 2] [--epochs 3] [--subsample 2000]
                   [--finetune_lr 5e-5] [--pretrain_lr 1e-3] [--runs_dir runs/grid]
                   [--extra="--precision bf16"]

Resumable: a run folder with summary.json is done and skipped; an interrupted one is
continued from its last.pt (--resume); one that stopped before its first save is removed
and run again from scratch.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Callable, Sequence

import report
from cli import build_parser, run_cli
from errors import ConfigError
from results import config_name, config_slug
from runfiles import CONFIG_FILE, LAST_FILE, SUMMARY_FILE, read_json

DATA_DIR_ENV = "MINBERT_DATA_DIR"  # the same variable the data loaders read
AUX_FILE = "yelp-aux-train.csv"
# Options that take several values (`--seeds 0 1 2`); the dataclass stores them as text.
LIST_OPTIONS = ("rows", "seeds")

Runner = Callable[[list], str]
DESCRIPTION = "Run the Table 1 grid (resumably), then write its table and figures."


@dataclass
class GridOptions:
    rows: str = field(default="all", metadata={
        "help": "rows to run, by slug or display name (e.g. finetune-mix-pcgrad-0.3), or 'all'; "
                "'methods' runs the comparison of aggregators and balancings instead"})
    seeds: str = field(default="0", metadata={"help": "seeds, e.g. --seeds 0 1 2"})
    epochs: int = field(default=3, metadata={"help": "training epochs per run"})
    subsample: int = field(default=0, metadata={"help": "per-task training-set cap (0: all)"})
    runs_dir: str = field(default="runs/grid", metadata={"help": "one folder per run below it"})
    data_dir: str = field(default="", metadata={
        "help": f"data folder; empty: ${DATA_DIR_ENV} or data"})
    aux: str = field(default="", metadata={
        "help": f"auxiliary-task file; empty: DATA_DIR/{AUX_FILE}"})
    checkpoint: str = field(default="", metadata={
        "help": "encoder checkpoint folder; empty: the trainer's default"})
    finetune_lr: float = field(default=0.0, metadata={
        "help": "learning rate of the finetune rows; 0: the trainer's default"})
    pretrain_lr: float = field(default=0.0, metadata={
        "help": "learning rate of the pretrain row; 0: the trainer's default"})
    extra: str = field(default="", metadata={
        "help": "extra trainer arguments for every run, e.g. --extra=\"--batch_size_quora 32\""})


def parse_options(argv: Sequence[str] | None = None) -> GridOptions:
    parser = build_parser(GridOptions, DESCRIPTION)
    for action in parser._actions:
        if action.dest in LIST_OPTIONS:
            action.nargs = "+"
    values = vars(parser.parse_args(argv))
    for name in LIST_OPTIONS:
        if isinstance(values[name], list):
            # a newline keeps display names with spaces intact (see split_list)
            values[name] = "\n".join(values[name])
    return GridOptions(**values)


def split_list(text: str, sep: str = r"[,\n]") -> list[str]:
    return [item.strip() for item in re.split(sep, text) if item.strip()]


def parse_seeds(text: str) -> list[int]:
    return [int(s) for s in split_list(text, r"[,\s]+")]


def data_dir(opts: GridOptions) -> str:
    return opts.data_dir or os.environ.get(DATA_DIR_ENV, "data")


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
AGGREGATOR_ROWS = ("sum", "pcgrad", "mgda", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl",
                   "upgrad", "dualproj", "rlw")
BALANCE_ROWS = ("uncertainty", "dwa", "grad_norm")
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


def trainer_argv(row: dict, seed: int, run_dir: str, opts: GridOptions) -> list[str]:
    argv = ["--option", row["option"], "--mode", row["mode"]]
    if row["pcgrad"]:
        argv.append("--pcgrad")
    if row["aux"]:
        argv += ["--aux", row["aux"]]
    if row.get("aggregator", "sum") not in ("sum", "pcgrad"):
        argv += ["--aggregator", row["aggregator"]]
    if row.get("balance", "none") != "none":
        argv += ["--balance", row["balance"]]
    for key in ("weight_sst", "weight_quora", "weight_sts"):
        if key in row:
            argv += [f"--{key}", str(row[key])]
    argv += ["--hidden_dropout_prob", str(row["hidden_dropout_prob"]), "--epochs", str(opts.epochs),
             "--seed", str(seed), "--run_dir", run_dir, "--data_dir", data_dir(opts)]
    if opts.subsample > 0:
        argv += ["--subsample", str(opts.subsample)]
    lr = row.get("lr") or (opts.pretrain_lr if row["option"] == "pretrain" else opts.finetune_lr)
    if lr > 0:
        argv += ["--lr", str(lr)]
    if opts.checkpoint:
        argv += ["--checkpoint", opts.checkpoint]
    return argv + shlex.split(opts.extra)


def is_done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, SUMMARY_FILE))


# Settings a finished run may differ in and still count as the run asked for.
HARMLESS = ("progress", "run_dir", "save_every_steps", "resume", "config")


def trainer_config(argv: list[str]):
    """The trainer's own parser and config checks: the full configuration of a run."""
    import multitask_classifier  # imported late: it pulls in torch and the model
    from cli import parse_config
    return parse_config(multitask_classifier.MultitaskConfig, argv)


def config_differences(saved: dict, wanted) -> dict:
    """Setting -> (found, wanted) for every setting of `wanted` that `saved` does not share;
    a setting the saved run predates counts as its default."""
    defaults = {f.name: f.default for f in fields(wanted) if f.default is not MISSING}
    differ = {}
    for key, value in asdict(wanted).items():
        found = saved.get(key, defaults.get(key))
        if key not in HARMLESS and found != value:
            differ[key] = (found, value)
    return differ


def check_same_run(run_dir: str, argv: list[str]) -> None:
    """A finished (or resumable) folder counts only if it ran exactly what is asked now; a changed
    lr, --extra, data folder or checkpoint must never reuse old numbers."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} has a summary.json but no {CONFIG_FILE}: not a run folder")
    differ = config_differences(read_json(path), trainer_config(argv))
    if differ:
        listed = "; ".join(f"{k}: {found!r} there, {want!r} now" for k, (found, want) in differ.items())
        raise ConfigError(f"{run_dir} is a run with other settings ({listed}); "
                          "remove it or use another --runs_dir")


def default_runner() -> Runner:
    import multitask_classifier  # imported late: it pulls in torch and the model
    return multitask_classifier.main


def run_grid(opts: GridOptions, runner: Runner | None = None) -> dict:
    """Runs what is missing, then writes RUNS_DIR/report; returns report.write_report's dict."""
    runner = runner or default_runner()
    aux_path = opts.aux or os.path.join(data_dir(opts), AUX_FILE)
    rows = grid_rows(opts.rows, aux_path)
    seeds = list(dict.fromkeys(parse_seeds(opts.seeds)))
    if not seeds:
        raise ConfigError("--seeds: no seeds given")
    # seeds outermost: a cut-short grid still has every row once
    jobs = [(row, seed) for seed in seeds for row in rows]
    for i, (row, seed) in enumerate(jobs, 1):
        run_dir = os.path.join(opts.runs_dir, f"{config_slug(row)}-seed{seed}")
        label = f"[{i}/{len(jobs)}] {config_name(row)} seed {seed}"
        argv = trainer_argv(row, seed, run_dir, opts)
        if is_done(run_dir):
            check_same_run(run_dir, argv)
            print(f"{label}: done, skipping")
            continue
        if os.path.isfile(os.path.join(run_dir, LAST_FILE)):
            check_same_run(run_dir, argv)
            print(f"{label}: {run_dir} was interrupted, resuming from its {LAST_FILE}", flush=True)
            argv = ["--resume", run_dir]
        elif os.path.exists(run_dir):
            print(f"{label}: {run_dir} stopped before its first save, rerunning from scratch")
            shutil.rmtree(run_dir)
        print(f"{label} -> {run_dir}", flush=True)
        finished = runner(argv) or run_dir
        if not is_done(finished):
            print(f"warning: {finished} has no summary.json after the run")
    return report.write_report(opts.runs_dir, os.path.join(opts.runs_dir, "report"))


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> dict:
    result = run_grid(parse_options(argv), runner)
    print(result["table_md"])
    for path in result["files"]:
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
