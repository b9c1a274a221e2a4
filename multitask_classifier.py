"""Multitask fine-tuning of BERT: SST-5 sentiment, Quora paraphrase, STS-B similarity
(and optionally an auxiliary Yelp sentiment task), trained four ways: pretrain (encoder
frozen), finetune-seq, finetune-mix, finetune-mix with PCGrad.

    python multitask_classifier.py --option finetune --mode mix --pcgrad
    python multitask_classifier.py --eval_only --load runs/<run>/best.pt
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from engine import run
from engine.cli import explicit_options, parse_config, run_cli
from engine.errors import ConfigError
from datasets import subsample
from evaluation import format_results
from engine.heads import ENCODINGS
from engine.paths import check_kind
from engine.aggregators import AGGREGATORS
from engine.balancing import BALANCERS
from engine.specs import AUX, SPECS, TASK_NAMES, canonical_tasks
from engine.tasks import Task, build_task
from utils import choose_device

SCRIPT = "multitask"


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class MultitaskConfig(run.RunConfig):
    mode: str = field(default="mix", metadata=_help(
        "seq: a full pass per task in turn; mix: each step one batch of every task",
        choices=["seq", "mix"]))
    aggregator: str = field(default="sum", metadata=_help(
        "how the tasks' encoder gradients combine each mix step (aggregators.py)",
        choices=list(AGGREGATORS)))
    pcgrad: bool = field(default=False, metadata=_help("PCGrad gradient surgery: --aggregator pcgrad"))
    pcgrad_reduction: str = field(default="sum", metadata=_help(
        "combine projected gradients by sum (the paper) or mean", choices=["sum", "mean"]))
    cagrad_c: float = field(default=0.4, metadata=_help("CAGrad's c (the radius of its ball)"))
    balance: str = field(default="none", metadata=_help(
        "loss balancing before the aggregator (balancing.py); grad_norm equalises the tasks' "
        "encoder gradient norms", choices=list(BALANCERS)))
    aux: str = field(default="", metadata=_help("auxiliary 5-class sentiment file (e.g. Yelp)"))
    tasks: str = field(default=",".join(TASK_NAMES), metadata=_help(
        "the evaluated tasks to train (comma-separated, any order), e.g. quora alone for a "
        "single-task baseline"))
    quora_encoding: str = field(default="cross", metadata=_help(
        "cross: the pair as one input; bi: each sentence alone", choices=list(ENCODINGS)))
    sts_encoding: str = field(default="bi", metadata=_help(
        "cross: the pair as one input; bi: cosine of the two sentences", choices=list(ENCODINGS)))
    seq_order: str = field(default=",".join(("quora", "sst", "sts")), metadata=_help(
        "task order of a seq epoch (comma-separated; an auxiliary task goes last)"))
    batch_size_sst: int = 8
    batch_size_quora: int = 16
    batch_size_sts: int = 6
    batch_size_aux: int = 4
    weight_sst: float = 1.0
    weight_quora: float = 1.0
    weight_sts: float = 1.0
    weight_aux: float = 1.0
    subsample: int = field(default=0, metadata=_help(
        "train on at most N examples per task (0: all), for quick budgets"))
    grad_diagnostics: bool = field(default=True, metadata=_help(
        "per-epoch cosine and conflict rate between task gradients (mix mode)"))
    grad_diagnostics_every: int = field(default=10, metadata=_help(
        "compute the gradient diagnostics on every Nth mix step only (steps N, 2N, ...): "
        "they need each task's gradient apart, which costs ~15%% of a step on a CPU, so "
        "the epoch means are taken over the sampled steps (1: every step). Aggregators "
        "and balancings need the task gradients, and compute them, every step"))
    eval_only: bool = field(default=False, metadata=_help(
        "evaluate and predict from --load (its saved config wins over training flags)"))
    load: str = field(default="", metadata=_help("a best.pt checkpoint, for --eval_only"))
    INT_RANGES: ClassVar[dict] = {
        **run.RunConfig.INT_RANGES, "subsample": (0, None), "grad_diagnostics_every": (1, None),
        **{f"batch_size_{name}": (1, None) for name in TASK_NAMES + (AUX.name,)}}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_number("cagrad_c", self.cagrad_c, low=0.0)
        check_kind("--aux", self.aux, "file")
        if self.pcgrad and self.aggregator not in ("sum", "pcgrad"):
            raise ConfigError(f"--pcgrad is --aggregator pcgrad; it contradicts --aggregator {self.aggregator}")
        if self.pcgrad or self.aggregator == "pcgrad":
            self.pcgrad, self.aggregator = True, "pcgrad"
        if self.pcgrad and self.mode != "mix":
            raise ConfigError("--pcgrad needs --mode mix (one batch of every task per step)")
        if (self.aggregator != "sum" or self.balance != "none") and self.mode != "mix":
            raise ConfigError("--aggregator and --balance need --mode mix (one batch of every task per step)")
        if self.eval_only and not self.load:
            raise ConfigError("--eval_only needs --load CHECKPOINT")
        chosen = self.tasks.split(",")
        if not set(chosen) <= set(TASK_NAMES) or len(set(chosen)) < len(chosen):
            raise ConfigError(f"--tasks must name some of {', '.join(TASK_NAMES)}, each once, "
                              f"got {self.tasks!r}")
        if sorted(self.seq_order.split(",")) != sorted(TASK_NAMES):
            raise ConfigError(f"--seq_order must name {', '.join(TASK_NAMES)} once each, "
                              f"got {self.seq_order!r}")
        for name in self.all_task_names:
            self.check_number(f"weight_{name}", self.weight(name), low=0.0)

    @property
    def task_names(self) -> tuple[str, ...]:
        return canonical_tasks(self.tasks.split(","))

    @property
    def all_task_names(self) -> tuple[str, ...]:
        return TASK_NAMES + (AUX.name,)

    def batch_size(self, task: str) -> int:
        return getattr(self, f"batch_size_{task}")

    def weight(self, task: str) -> float:
        return getattr(self, f"weight_{task}")

    def encoding(self, task: str) -> str:
        return getattr(self, f"{task}_encoding", "cross")

    def aggregator_options(self) -> dict:
        return {"pcgrad": {"reduction": self.pcgrad_reduction},
                "cagrad": {"c": self.cagrad_c}}.get(self.aggregator, {})

    def run_name(self) -> str:
        name = "pretrain" if self.option == "pretrain" else f"finetune-{self.mode}"
        name += "" if self.aggregator == "sum" else f"-{self.aggregator}"
        name += "" if self.balance == "none" else f"-{self.balance}"
        name += "-aux" if self.aux else ""
        name += "" if self.task_names == TASK_NAMES else "-" + "-".join(self.task_names)
        return f"{name}-{self.hidden_dropout_prob:g}"


def build_tasks(cfg: MultitaskConfig, tokenizer, bert_config, splits=run.SPLITS) -> list[Task]:
    """The chosen tasks (and the auxiliary one, for training only), heads fresh."""
    specs = [SPECS[name] for name in cfg.task_names]
    specs += [AUX] if cfg.aux and "train" in splits else []
    tasks = [build_task(spec, cfg.data_dir, tokenizer, bert_config, cfg.batch_size(spec.name),
                        cfg.hidden_dropout_prob, cfg.pooling, cfg.encoding(spec.name), splits,
                        train_path=cfg.aux if spec is AUX else "", weight=cfg.weight(spec.name))
             for spec in specs]
    for i, task in enumerate(tasks):
        task.train = subsample(task.train, cfg.subsample, cfg.seed + i)
    return tasks


def train(cfg: MultitaskConfig) -> str:
    run_dir, summary, tasks = run.train(cfg, SCRIPT, build_tasks, cfg.run_name())
    budget = f", training subsample {cfg.subsample}" if cfg.subsample else ""
    title = (f"dev results of {cfg.run_name()} (best epoch {summary['best_epoch']} of "
             f"{summary['epochs']}{budget})")
    scores = {k: v for k, v in summary["best"].items() if k != "overall"}
    print(format_results(scores, tasks, title) + f"\nrun folder: {run_dir}")
    return run_dir


def evaluate_checkpoint(cfg: MultitaskConfig, given: dict) -> str:
    """--eval_only: rebuild the model a checkpoint was trained as, then predict."""
    saved = run.load_saved(cfg.load, SCRIPT)
    ignored = sorted(set(given) - {"eval_only", "load", "data_dir", "run_dir", "use_gpu", "progress"})
    if ignored:
        print(f"note: --eval_only uses the checkpoint's own settings; ignoring "
              f"{', '.join('--' + name for name in ignored)}")
    trained = MultitaskConfig.from_saved(saved["config"], data_dir=cfg.data_dir, aux="",
                                         eval_only=False, load="", use_gpu=cfg.use_gpu)
    run_dir = run.evaluation_dir(cfg.load, cfg.run_dir)
    predictions, scores = run.evaluate_saved(cfg.load, trained, build_tasks, saved, run_dir,
                                             choose_device(cfg.use_gpu))
    tasks = [p.task for p in predictions]
    print(format_results(scores, tasks, f"dev results of {cfg.load}")
          + f"\npredictions in {run_dir}")
    return run_dir


def main(argv: list[str] | None = None) -> str:
    """Train (or, with --eval_only, evaluate); returns the run folder."""
    cfg = parse_config(MultitaskConfig, argv, description=__doc__)
    if cfg.eval_only:
        return evaluate_checkpoint(cfg, explicit_options(MultitaskConfig, argv))
    if cfg.resume:
        cfg = run.resume_config(MultitaskConfig, explicit_options(MultitaskConfig, argv))
    return train(cfg)


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
