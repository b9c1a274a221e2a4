"""Multitask fine-tuning of BERT: SST-5 sentiment, Quora paraphrase, STS-B similarity
(and optionally an auxiliary Yelp sentiment task), trained four ways: pretrain (encoder
frozen), finetune-seq, finetune-mix, finetune-mix with PCGrad.

    python multitask_classifier.py --option finetune --mode mix --pcgrad
    python multitask_classifier.py --eval_only --load runs/<run>/best.pt
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

from base_bert import default_checkpoint_path, from_pretrained
from bert import BertModel
from config import BertConfig, ConfigError, config_to_dict, parse_config
from datasets import default_data_dir, subsample
from tasks import ENCODINGS, POOLINGS, SPECS, Task, aux_spec, build_task
from tokenizer import BertTokenizer
from trainer import MultitaskBERT, Trainer, TrainSettings, write_all_predictions
from utils import (choose_device, load_checkpoint, run_cli, seed_everything, start_run_dir,
                   use_bf16)

TASK_NAMES = ("sst", "quora", "sts")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class MultitaskConfig:
    option: str = field(default="finetune", metadata=_help(
        "pretrain: encoder frozen, heads trained; finetune: everything trains",
        choices=["pretrain", "finetune"]))
    mode: str = field(default="mix", metadata=_help(
        "seq: a full pass per task in turn; mix: each step one batch of every task",
        choices=["seq", "mix"]))
    pcgrad: bool = field(default=False, metadata=_help("PCGrad gradient surgery (mix mode)"))
    pcgrad_reduction: str = field(default="sum", metadata=_help(
        "combine projected gradients by sum (the paper) or mean", choices=["sum", "mean"]))
    aux: str = field(default="", metadata=_help("auxiliary 5-class sentiment file (e.g. Yelp)"))
    tasks: str = field(default=",".join(TASK_NAMES), metadata=_help(
        "the evaluated tasks to train (comma-separated), e.g. quora alone for a single-task baseline"))
    epochs: int = 3
    lr: float = field(default=0.0, metadata=_help("0: 1e-3 for pretrain, 1e-5 for finetune"))
    head_lr: float = field(default=0.0, metadata=_help(
        "learning rate of the task heads; 0: the same as --lr"))
    weight_decay: float = 0.0
    scheduler: str = field(default="constant", metadata=_help(
        "learning-rate schedule after warmup", choices=["constant", "linear"]))
    warmup_ratio: float = 0.0
    hidden_dropout_prob: float = field(default=0.3, metadata=_help("dropout of the task heads"))
    seed: int = 11711
    use_gpu: bool = field(default=False, metadata=_help("use CUDA when present"))
    checkpoint: str = field(default="", metadata=_help(
        "HF-format BERT folder (default: the packaged all-MiniLM-L6-v2)"))
    data_dir: str = field(default_factory=default_data_dir, metadata=_help(
        "data folder (env MINBERT_DATA_DIR)"))
    max_length: int = 128
    pooling: str = field(default="mean", metadata=_help(
        "sentence vector for the linear heads", choices=list(POOLINGS)))
    quora_encoding: str = field(default="cross", metadata=_help(
        "cross: the pair as one input; bi: each sentence alone", choices=list(ENCODINGS)))
    sts_encoding: str = field(default="bi", metadata=_help(
        "cross: the pair as one input; bi: cosine of the two sentences", choices=list(ENCODINGS)))
    seq_order: str = field(default="quora,sst,sts", metadata=_help(
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
    bucket: bool = field(default=True, metadata=_help("length-bucketed training batches"))
    grad_diagnostics: bool = field(default=True, metadata=_help(
        "per-epoch cosine and conflict rate between task gradients (mix mode)"))
    run_dir: str = field(default="", metadata=_help("output folder (default runs/<name>-<time>)"))
    eval_only: bool = field(default=False, metadata=_help("evaluate and predict from --load"))
    load: str = field(default="", metadata=_help("a best.pt checkpoint, for --eval_only"))
    progress: bool = field(default=True, metadata=_help("tqdm progress bars"))
    precision: str = field(default="fp32", metadata=_help(
        "bf16: bfloat16 autocast; auto: bf16 where the hardware computes it natively",
        choices=["fp32", "bf16", "auto"]))

    def __post_init__(self) -> None:
        if not self.lr:
            self.lr = 1e-3 if self.option == "pretrain" else 1e-5
        if self.pcgrad and self.mode != "mix":
            raise ConfigError("--pcgrad needs --mode mix (one batch of every task per step)")
        if self.eval_only and not self.load:
            raise ConfigError("--eval_only needs --load CHECKPOINT")
        chosen = self.task_names
        if any(name not in TASK_NAMES for name in chosen) or len(set(chosen)) < len(chosen):
            raise ConfigError(f"--tasks must name some of {', '.join(TASK_NAMES)}, each once, "
                              f"got {self.tasks!r}")
        if sorted(self.seq_order.split(",")) != sorted(TASK_NAMES):
            raise ConfigError(f"--seq_order must name {', '.join(TASK_NAMES)} once each, "
                              f"got {self.seq_order!r}")
        for name in ("epochs", "max_length", "batch_size_sst", "batch_size_quora",
                     "batch_size_sts", "batch_size_aux"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")

    @property
    def task_names(self) -> list[str]:
        return self.tasks.split(",")

    def run_name(self) -> str:
        name = "pretrain" if self.option == "pretrain" else f"finetune-{self.mode}"
        name += "-pcgrad" if self.pcgrad else ""
        name += "-aux" if self.aux else ""
        name += "" if self.task_names == list(TASK_NAMES) else "-" + "-".join(self.task_names)
        return f"{name}-{self.hidden_dropout_prob:g}"


def build_tasks(cfg: MultitaskConfig, tokenizer: BertTokenizer, bert_config: BertConfig,
                with_eval: bool = True) -> list[Task]:
    encodings = {"quora": cfg.quora_encoding, "sts": cfg.sts_encoding}
    tasks = [build_task(SPECS[name], cfg.data_dir, tokenizer, bert_config,
                        getattr(cfg, f"batch_size_{name}"), cfg.hidden_dropout_prob,
                        cfg.pooling, encodings.get(name, "cross"), with_eval,
                        weight=getattr(cfg, f"weight_{name}"))
             for name in TASK_NAMES if name in cfg.task_names]
    if cfg.aux:
        tasks.append(build_task(aux_spec(), cfg.data_dir, tokenizer, bert_config,
                                cfg.batch_size_aux, cfg.hidden_dropout_prob, cfg.pooling,
                                with_eval=False, train_path=cfg.aux, weight=cfg.weight_aux))
    for i, task in enumerate(tasks):
        task.train = subsample(task.train, cfg.subsample, cfg.seed + i)
    return tasks


def build_model(cfg: MultitaskConfig, encoder: BertModel,
                tasks: list[Task]) -> MultitaskBERT:
    bf16 = use_bf16(cfg.precision, choose_device(cfg.use_gpu))
    return MultitaskBERT(encoder, {t.name: t.head for t in tasks}, bf16=bf16)


def evaluate_checkpoint(cfg: MultitaskConfig) -> str:
    """--eval_only: rebuild the model a checkpoint was trained as, then predict."""
    saved = load_checkpoint(cfg.load)
    trained = MultitaskConfig(**{**saved["config"], "data_dir": cfg.data_dir,
                                 "eval_only": False, "load": ""})
    bert_config = BertConfig(**saved["bert_config"])
    tokenizer = BertTokenizer.from_pretrained(trained.checkpoint or None, trained.max_length)
    tasks = build_tasks(trained, tokenizer, bert_config)
    model = build_model(trained, BertModel(bert_config), tasks)
    model.load_state_dict(saved["model"])
    run_dir = cfg.run_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.load)), "eval")
    device = choose_device(cfg.use_gpu)
    dev = write_all_predictions(model.to(device), [t for t in tasks if t.spec.evaluated],
                                run_dir, device)
    print(format_dev(dev) + f"; predictions in {run_dir}")
    return run_dir


def format_dev(dev: dict[str, float]) -> str:
    metrics = {k: v for k, v in dev.items() if k != "overall"}
    return ("dev: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            + f" | overall {sum(metrics.values()) / len(metrics):.3f}")


def train(cfg: MultitaskConfig) -> str:
    seed_everything(cfg.seed)
    device = choose_device(cfg.use_gpu)
    encoder = from_pretrained(cfg.checkpoint or None)
    tokenizer = BertTokenizer.from_pretrained(cfg.checkpoint or None, cfg.max_length)
    tasks = build_tasks(cfg, tokenizer, encoder.config)
    model = build_model(cfg, encoder, tasks)
    run_dir = cfg.run_dir or os.path.join("runs", f"{cfg.run_name()}-{time.strftime('%Y%m%d-%H%M%S')}")
    start_run_dir(run_dir, config_to_dict(cfg))
    print(f"{cfg.run_name()} on {device}{' (bf16 autocast)' if model.bf16 else ''}: checkpoint {cfg.checkpoint or default_checkpoint_path()}")
    for task in tasks:
        note = f" (subsample of {cfg.subsample})" if cfg.subsample else ""
        print(f"  {task.name}: {len(task.train)} train{note}, {len(task.dev)} dev, "
              f"{len(task.test)} test, batch {task.batch_size}")
    settings = TrainSettings(
        epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr, mode=cfg.mode,
        freeze_encoder=cfg.option == "pretrain",
        pcgrad=cfg.pcgrad, pcgrad_reduction=cfg.pcgrad_reduction,
        grad_diagnostics=cfg.grad_diagnostics, weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio, scheduler=cfg.scheduler, bucket=cfg.bucket,
        seq_order=tuple(cfg.seq_order.split(",")), seed=cfg.seed, progress=cfg.progress)
    extra = {"config": config_to_dict(cfg), "bert_config": dataclasses.asdict(encoder.config)}
    summary = Trainer(model, tasks, settings, device, run_dir, extra).fit()
    print(dev_table(summary, tasks, cfg) + f"\nrun folder: {run_dir}")
    return run_dir


def dev_table(summary: dict, tasks: list[Task], cfg: MultitaskConfig) -> str:
    best = summary["best"]
    lines = [f"dev results of {cfg.run_name()} (best epoch {summary['best_epoch']} of "
             f"{summary['epochs']}{', training subsample ' + str(cfg.subsample) if cfg.subsample else ''})",
             f"  {'task':<8}{'metric':<10}{'value':>7}"]
    lines += [f"  {t.name:<8}{t.metric_name:<10}{best[t.name]:>7.3f}" for t in tasks if t.spec.evaluated]
    lines.append(f"  {'overall':<8}{'mean':<10}{best['overall']:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Train (or, with --eval_only, evaluate); returns the run folder."""
    cfg = parse_config(MultitaskConfig, argv, description=__doc__)
    return evaluate_checkpoint(cfg) if cfg.eval_only else train(cfg)


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
