"""Single-task sentiment classification, the sanity run before multitask training:
SST-5 or CFIMDB on a pooled sentence vector with dropout and a linear head.

    python classifier.py --task sst --option finetune --epochs 3
    python classifier.py --task cfimdb --option pretrain
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from engine import run
from engine.cli import explicit_options, parse_config, run_cli
from engine.specs import CLASSIFIER_TASKS, SPECS
from engine.tasks import Task, build_task

SCRIPT = "classifier"


@dataclass
class ClassifierConfig(run.RunConfig):
    task: str = field(default="sst", metadata={"help": "dataset", "choices": list(CLASSIFIER_TASKS)})
    option: str = field(default="pretrain", metadata={
        "help": "pretrain: encoder frozen; finetune: everything trains",
        "choices": ["pretrain", "finetune"]})
    batch_size: int = 8
    # One task: every step is a plain step, with nothing to combine or compare.
    mode: ClassVar[str] = "mix"
    aggregator: ClassVar[str] = "sum"
    balance: ClassVar[str] = "none"
    grad_diagnostics: ClassVar[bool] = False
    grad_diagnostics_every: ClassVar[int] = 1
    seq_order: ClassVar[str] = ""
    INT_RANGES: ClassVar[dict] = {**run.RunConfig.INT_RANGES, "batch_size": (1, None)}

    def aggregator_options(self) -> dict:
        return {}

    def run_name(self) -> str:
        return f"{self.option}-{self.task}"


def build_tasks(cfg: ClassifierConfig, tokenizer, bert_config, splits=run.SPLITS) -> list[Task]:
    return [build_task(SPECS[cfg.task], cfg.data_dir, tokenizer, bert_config, cfg.batch_size,
                       cfg.hidden_dropout_prob, cfg.pooling, splits=splits)]


def train(cfg: ClassifierConfig) -> dict:
    run_dir, summary, _ = run.train(cfg, SCRIPT, build_tasks, cfg.run_name())
    print(f"{cfg.run_name()}: best epoch {summary['best_epoch']}, dev accuracy "
          f"{summary['best'][cfg.task]:.3f}; predictions in {run_dir}/predictions")
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ClassifierConfig, argv, description=__doc__)
    if cfg.resume:
        cfg = run.resume_config(ClassifierConfig, explicit_options(ClassifierConfig, argv))
    return train(cfg)


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
