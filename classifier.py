"""Single-task sentiment classification, the sanity run before multitask training:
SST-5 or CFIMDB on a pooled sentence vector with dropout and a linear head.

    python classifier.py --task sst --option finetune --epochs 3
    python classifier.py --task cfimdb --option pretrain
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

from base_bert import from_pretrained
from config import ConfigError, config_to_dict, parse_config
from datasets import default_data_dir
from tasks import POOLINGS, SPECS, build_task
from tokenizer import BertTokenizer
from trainer import MultitaskBERT, Trainer, TrainSettings
from utils import choose_device, run_cli, seed_everything, start_run_dir, use_bf16


@dataclass
class ClassifierConfig:
    task: str = field(default="sst", metadata={"help": "dataset", "choices": ["sst", "cfimdb"]})
    option: str = field(default="pretrain", metadata={
        "help": "pretrain: encoder frozen; finetune: everything trains",
        "choices": ["pretrain", "finetune"]})
    epochs: int = 3
    batch_size: int = 8
    lr: float = field(default=0.0, metadata={"help": "0: 1e-3 for pretrain, 1e-5 for finetune"})
    head_lr: float = field(default=0.0, metadata={
        "help": "learning rate of the task heads; 0: the same as --lr"})
    weight_decay: float = 0.0
    scheduler: str = field(default="constant", metadata={"choices": ["constant", "linear"]})
    warmup_ratio: float = 0.0
    hidden_dropout_prob: float = 0.3
    seed: int = 11711
    use_gpu: bool = False
    checkpoint: str = field(default="", metadata={
        "help": "HF-format BERT folder (default: the packaged all-MiniLM-L6-v2)"})
    data_dir: str = field(default_factory=default_data_dir,
                          metadata={"help": "data folder (env MINBERT_DATA_DIR)"})
    max_length: int = 128
    pooling: str = field(default="mean", metadata={"choices": list(POOLINGS)})
    bucket: bool = field(default=True, metadata={"help": "length-bucketed training batches"})
    run_dir: str = field(default="", metadata={"help": "output folder (default runs/<name>-<time>)"})
    progress: bool = True
    precision: str = field(default="fp32", metadata={
        "help": "bf16: bfloat16 autocast; auto: bf16 where the hardware computes it natively",
        "choices": ["fp32", "bf16", "auto"]})

    def __post_init__(self) -> None:
        if not self.lr:
            self.lr = 1e-3 if self.option == "pretrain" else 1e-5
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")


def train(cfg: ClassifierConfig) -> dict:
    seed_everything(cfg.seed)
    device = choose_device(cfg.use_gpu)
    encoder = from_pretrained(cfg.checkpoint or None)
    tokenizer = BertTokenizer.from_pretrained(cfg.checkpoint or None, cfg.max_length)
    task = build_task(SPECS[cfg.task], cfg.data_dir, tokenizer, encoder.config, cfg.batch_size,
                      cfg.hidden_dropout_prob, cfg.pooling)
    name = f"{cfg.option}-{cfg.task}"
    run_dir = cfg.run_dir or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    start_run_dir(run_dir, config_to_dict(cfg))
    print(f"{name} on {device}: {len(task.train)} train, {len(task.dev)} dev, "
          f"{len(task.test)} test; lr {cfg.lr:g}")
    settings = TrainSettings(
        epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr, mode="mix",
        freeze_encoder=cfg.option == "pretrain",
        grad_diagnostics=False, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
        scheduler=cfg.scheduler, bucket=cfg.bucket, seed=cfg.seed, progress=cfg.progress)
    extra = {"config": config_to_dict(cfg), "bert_config": dataclasses.asdict(encoder.config)}
    model = MultitaskBERT(encoder, {task.name: task.head}, bf16=use_bf16(cfg.precision, device))
    summary = Trainer(model, [task], settings, device, run_dir, extra).fit()
    print(f"{name}: best epoch {summary['best_epoch']}, dev accuracy "
          f"{summary['best'][task.name]:.3f}; predictions in {run_dir}/predictions")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(ClassifierConfig, argv, description=__doc__))


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
