"""Runs a grid of configurations (by default the 8 rows of the report's Table 1; `--rows
methods`: the comparison of gradient-combination methods; `--rows FILE.toml`: named rows of
trainer flags), one run folder per configuration x seed, then writes the table and figures
with report.py.

    python grid.py [--rows all] [--seeds 0 1 2] [--epochs 3] [--subsample 2000]
                   [--finetune_lr 5e-5] [--pretrain_lr 1e-3] [--runs_dir runs/grid]
                   [--extra="--precision bf16"] [--jobs 1] [--print_commands]

--jobs N runs N at once as subprocesses (RUNS_DIR/logs/<run>.log); --print_commands prints
the trainer command of each run still to do and runs nothing (then: python report.py RUNS_DIR).

Resumable: a run folder with summary.json is done and skipped; an interrupted one is
continued from its last.pt (--resume); one that stopped before its first save is removed
and run again from scratch (unless a process is using it: each run locks its folder).
"""
from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, ClassVar, Sequence

import report
from engine.cli import build_parser, check_ranges, parse_config, run_cli
from engine.configs import DATA_DIR_ENV, MultitaskConfig, default_data_dir
from engine.errors import ConfigError
from analysis.results import config_name, config_slug, settings
from engine.runfiles import CONFIG_FILE, LAST_FILE, check_output, holds_run, read_json
from engine.grid_jobs import (Job, RunsFailed, clear_unsaved, is_done, run_parallel,
                              trainer_command, visible_gpus)
from engine.grid_rows import check_extra, check_named_row, grid_rows, parse_seeds

AUX_FILE = "yelp-aux-train.csv"
# Options that take several values (`--seeds 0 1 2`); the dataclass stores them as text.
LIST_OPTIONS = ("rows", "seeds")

Runner = Callable[[list], str]
LOGS_DIR = "logs"  # --jobs N: each run's output goes to RUNS_DIR/logs/<run>.log
DESCRIPTION = "Run the Table 1 grid (resumably), then write its table and figures."


@dataclass
class GridOptions:
    rows: str = field(default="all", metadata={
        "help": "rows to run, by slug or display name (e.g. finetune-mix-pcgrad-0.3), or 'all'; "
                "'methods' runs the comparison of aggregators and balancings instead; a .toml "
                "file of named rows of trainer flags (docs/rows-example.toml), optionally "
                "followed by the names of the rows to run"})
    seeds: str = field(default="0", metadata={"help": "seeds, e.g. --seeds 0 1 2"})
    epochs: int = field(default=3, metadata={"help": "training epochs per run"})
    subsample: int = field(default=0, metadata={"help": "per-task training-set cap (0: all)"})
    subsample_fraction: float = field(default=0.0, metadata={
        "help": "per-task training-set fraction (0: all): the tasks keep their relative sizes"})
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
    jobs: int = field(default=1, metadata={
        "help": "runs at once; above 1 each is a subprocess with its own GPU when several are "
                "visible, else cores/jobs CPU threads, logging to RUNS_DIR/logs/"})
    gpus: str = field(default="", metadata={
        "help": "with --jobs: the GPUs to share out, e.g. 0,1; empty: $CUDA_VISIBLE_DEVICES "
                "or nvidia-smi -L (used when there are several)"})
    print_commands: bool = field(default=False, metadata={
        "help": "print one trainer command per run still to do (resumes as --resume DIR), "
                "run nothing; then python report.py RUNS_DIR"})
    INT_RANGES: ClassVar[dict] = {"epochs": (1, None), "subsample": (0, None), "jobs": (1, None)}

    def __post_init__(self) -> None:
        check_ranges(self)
        for name in ("finetune_lr", "pretrain_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name} must be a finite number >= 0 (0: the trainer's "
                                  f"default), got {value}")
        if not 0 <= self.subsample_fraction < 1 or (self.subsample and self.subsample_fraction):
            raise ConfigError(f"--subsample_fraction must be in [0, 1) and not given with "
                              f"--subsample, got {self.subsample_fraction}")
        parse_seeds(self.seeds)
        check_extra(self.extra)


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


def data_dir(opts: GridOptions) -> str:
    return opts.data_dir or default_data_dir()


def row_flags(row: dict) -> list[str]:
    """The trainer flags that make a row: a named row's own (--rows FILE) under its name."""
    if "flags" in row:
        return ["--label", row["label"], *row["flags"]]
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
    return argv + ["--hidden_dropout_prob", str(row["hidden_dropout_prob"])]


def trainer_argv(row: dict, seed: int, run_dir: str, opts: GridOptions) -> list[str]:
    argv = row_flags(row) + ["--epochs", str(opts.epochs), "--seed", str(seed),
                             "--run_dir", run_dir, "--data_dir", data_dir(opts)]
    if opts.subsample > 0:
        argv += ["--subsample", str(opts.subsample)]
    if opts.subsample_fraction > 0:
        argv += ["--subsample_fraction", str(opts.subsample_fraction)]
    lr = row.get("lr") or (opts.pretrain_lr if row["option"] == "pretrain" else opts.finetune_lr)
    if lr > 0 and "lr" not in row.get("sets", ()):  # a named row's own --lr wins
        argv += ["--lr", str(lr)]
    if opts.checkpoint:
        argv += ["--checkpoint", opts.checkpoint]
    return argv + shlex.split(opts.extra)


# Settings a finished run may differ in and still count as the run asked for.
HARMLESS = ("progress", "run_dir", "save_every_steps", "resume", "config")


def trainer_config(argv: list[str]):
    """The trainer's own parser and config checks: the full configuration of a run."""
    return parse_config(MultitaskConfig, argv)


def config_differences(saved: dict, wanted: MultitaskConfig) -> dict:
    """Setting -> (found, wanted) for every setting of `wanted` that `saved` does not share;
    a setting the saved run predates counts as its default (read through the config class)."""
    found = asdict(settings(saved))
    return {key: (found[key], value) for key, value in asdict(wanted).items()
            if key not in HARMLESS and found[key] != value}


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


def plan(opts: GridOptions, say: Callable[[str], None] = print) -> list[Job]:
    """The runs still to do, seeds outermost (a cut-short grid still has every row once):
    a finished folder is skipped, an interrupted one resumed from its last.pt (both only if
    they ran the settings asked for now)."""
    aux_path = opts.aux or os.path.join(data_dir(opts), AUX_FILE)
    check_output("--runs_dir", opts.runs_dir, (data_dir(opts), aux_path, opts.checkpoint))
    rows = grid_rows(opts.rows, aux_path)
    seeds = list(dict.fromkeys(parse_seeds(opts.seeds)))
    if not seeds:
        raise ConfigError("--seeds: no seeds given")
    pairs = [(row, seed) for seed in seeds for row in rows]
    for row in rows:
        if "flags" in row:  # a named row: checked whole before any run starts
            check_named_row(row, shlex.split(opts.extra),
                            trainer_argv(row, seeds[0], opts.runs_dir, opts), trainer_config)
    todo = []
    for i, (row, seed) in enumerate(pairs, 1):
        name = f"{config_slug(row)}-seed{seed}"
        run_dir = os.path.join(opts.runs_dir, name)
        label = f"[{i}/{len(pairs)}] {config_name(row)} seed {seed}"
        argv = trainer_argv(row, seed, run_dir, opts)
        if is_done(run_dir):
            check_same_run(run_dir, argv)
            say(f"{label}: done, skipping")
            continue
        if os.path.isfile(os.path.join(run_dir, LAST_FILE)):
            check_same_run(run_dir, argv)
            say(f"{label}: {run_dir} was interrupted, resuming from its {LAST_FILE}")
            argv = ["--resume", run_dir]
        todo.append(Job(label, run_dir, argv, os.path.join(opts.runs_dir, LOGS_DIR, name + ".log")))
    return todo


def run_in_process(todo: list[Job], runner: Runner) -> list[Job]:
    """--jobs 1: one run after the other, in this process."""
    for job in todo:
        clear_unsaved(job, print)
        print(f"{job.label} -> {job.run_dir}", flush=True)
        finished = runner(job.argv) or job.run_dir
        if not is_done(finished):
            print(f"warning: {finished} has no summary.json after the run")
    return []


def run_grid(opts: GridOptions, runner: Runner | None = None) -> dict:
    """Runs what is missing, then writes RUNS_DIR/report; returns report.write_report's dict
    (with "failed": the runs of a parallel grid that failed, each with its log)."""
    todo = plan(opts)
    if opts.jobs == 1:
        failed = run_in_process(todo, runner or default_runner())
    else:
        gpus = visible_gpus(opts.gpus)
        failed = run_parallel(todo, opts.jobs, gpus if opts.gpus or len(gpus) > 1 else [],
                              partial(print, flush=True))
    result = report.write_report(opts.runs_dir, os.path.join(opts.runs_dir, "report"),
                                 allow_empty=bool(failed))  # the failures say why
    result["failed"] = [{"run_dir": j.run_dir, "log": j.log} for j in failed]
    return result


def print_commands(opts: GridOptions) -> list[str]:
    """One shell command per run still to do (a resume as --resume DIR), for a SLURM array
    or `xargs -P`; runs nothing. What is skipped goes to stderr."""
    todo = plan(opts, say=lambda text: print(text, file=sys.stderr))
    commands = []
    for job in todo:
        if holds_run(job.run_dir) and job.argv[:1] != ["--resume"]:
            print(f"{job.label}: {job.run_dir} stopped before its first save: remove it "
                  "before running its command", file=sys.stderr)
        commands.append(shlex.join(trainer_command(job.argv)))
        print(commands[-1], flush=True)
    return commands


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> dict:
    opts = parse_options(argv)
    if opts.print_commands:
        return {"commands": print_commands(opts)}
    result = run_grid(opts, runner)
    print(result["table_md"])
    for path in result["files"]:
        print(f"wrote {path}")
    if result["failed"]:
        listed = "\n".join(f"  {f['run_dir']}: see {f['log']}" for f in result["failed"])
        raise RunsFailed(f"{len(result['failed'])} run(s) failed (the report holds the "
                         f"others):\n{listed}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
