"""Training loops shared by classifier.py and multitask_classifier.py: one shared encoder,
a head per task, and the report's training methods (section 4.3):
  seq: a full pass over each task in turn, each task with its own optimizer;
  mix: every step one batch of every task ("max_size_cycle": an epoch lasts as many
       steps as the largest task has batches; smaller tasks restart), losses summed,
       optionally combined by PCGrad instead of summed.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from bert import BertModel
from datasets import Batch, make_loader
from evaluation import predict, write_predictions
from optimizer import AdamW
from pcgrad import PCGrad, gradient_cosines
from tasks import Task
from utils import (CHECKPOINT_FILE, METRICS_FILE, PREDICTIONS_DIR, SUMMARY_FILE, append_jsonl,
                   load_checkpoint, save_checkpoint, write_json)


class MultitaskBERT(nn.Module):
    """One shared encoder and one head per task (the report's section 4.2).
    `bf16=True` runs the forward pass under bfloat16 autocast (fp32 weights, optimizer
    and losses); the outputs come back as fp32."""

    def __init__(self, encoder: BertModel, heads: dict[str, nn.Module], bf16: bool = False):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.bf16 = bf16

    def forward(self, task_name: str, batch: Batch) -> torch.Tensor:
        device_type = batch.encoded.input_ids.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.heads[task_name](self.encoder, batch).float()

    def train_encoder(self, train: bool) -> None:
        """Freeze or unfreeze the encoder. The pooler layer trains only if a head reads it:
        unread, it would get all-zero gradients from PCGrad's buffers and still decay under
        weight decay."""
        self.encoder.requires_grad_(train)
        if not any(head.reads_pooler for head in self.heads.values()):
            self.encoder.pooler_dense.requires_grad_(False)


@dataclass
class TrainSettings:
    epochs: int
    lr: float
    head_lr: float = 0.0  # 0: lr
    mode: str = "mix"  # "seq" | "mix"
    freeze_encoder: bool = False
    pcgrad: bool = False
    pcgrad_reduction: str = "sum"
    grad_diagnostics: bool = True
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: str = "constant"  # "constant" | "linear" (decay to 0 after warmup)
    bucket: bool = True
    seq_order: tuple[str, ...] = ("quora", "sst", "sts")  # seq mode; other tasks go last
    seed: int = 0
    progress: bool = True


def forever(loader) -> Iterator[Batch]:
    """Restart a loader when exhausted (a fresh shuffle each time), unlike itertools.cycle."""
    while True:
        yield from loader


def make_optimizer(encoder_params, head_params, settings: TrainSettings, total_steps: int):
    """AdamW with the encoder at lr and the freshly initialised heads at head_lr (or lr),
    both on one warmup/decay schedule."""
    groups = [{"params": [p for p in params if p.requires_grad], "lr": lr}
              for params, lr in ((encoder_params, settings.lr),
                                 (head_params, settings.head_lr or settings.lr))]
    optimizer = AdamW([g for g in groups if g["params"]], lr=settings.lr,
                      weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if settings.scheduler == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def mix_step(model: MultitaskBERT, tasks: list[Task], batches: list[Batch], optimizer,
             surgery: PCGrad | None = None) -> tuple[list[float], torch.Tensor | None]:
    """One finetune-mix step: a batch of every task, losses summed, or their encoder
    gradients combined by PCGrad. Returns the task losses and the gradient Gram matrix."""
    optimizer.zero_grad(set_to_none=True)
    losses = [task.loss(model(task.name, batch), batch.labels)
              for task, batch in zip(tasks, batches)]
    if surgery is not None:
        gram = surgery.pc_backward(losses)  # PCGrad, or the plain sum + diagnostics
    else:
        gram = None
        torch.stack(losses).sum().backward()
    optimizer.step()
    return [loss.item() for loss in losses], gram


class Trainer:
    """Trains, evaluates each epoch, keeps the best checkpoint by the mean dev metric, and
    writes metrics (JSON lines) and the best model's predictions into `run_dir`."""

    def __init__(self, model: MultitaskBERT, tasks: list[Task], settings: TrainSettings,
                 device: torch.device, run_dir: str, checkpoint_extra: dict,
                 log: Callable[[str], None] = print):
        self.model, self.tasks, self.settings = model.to(device), tasks, settings
        self.device, self.run_dir, self.log = device, run_dir, log
        self.checkpoint_extra = checkpoint_extra
        self.model.train_encoder(not settings.freeze_encoder)
        self.loaders = {t.name: make_loader(t.train, t.collate, t.batch_size, shuffle=True,
                                            bucket=settings.bucket, seed=settings.seed)
                        for t in tasks}
        self.eval_tasks = [t for t in tasks if t.spec.evaluated]
        self.best_path = os.path.join(run_dir, CHECKPOINT_FILE)

    # --- training ------------------------------------------------------------------------

    def fit(self) -> dict:
        train_epoch = self.train_epoch_mix if self.settings.mode == "mix" else self.train_epoch_seq
        self.setup_optimizers()
        best, best_epoch, best_dev = -math.inf, 0, {}
        for epoch in range(1, self.settings.epochs + 1):
            start = time.time()
            losses, grad_stats = train_epoch(epoch)
            dev, outputs = self.evaluate()
            overall = sum(dev.values()) / len(dev)
            record = {"epoch": epoch, "train_loss": losses, "dev": dev, "overall": overall,
                      **grad_stats, "seconds": round(time.time() - start, 1)}
            append_jsonl(os.path.join(self.run_dir, METRICS_FILE), record)
            self.log(format_epoch(record))
            if overall > best:
                best, best_epoch, best_dev = overall, epoch, {**dev, "overall": overall}
                self.save(epoch, dev, overall)
                self.write_dev_predictions(outputs)
        return self.finish(best_epoch, best_dev)

    def setup_optimizers(self) -> None:
        s = self.settings
        encoder_params = list(self.model.encoder.parameters())
        if s.mode == "mix":
            steps = s.epochs * max(len(loader) for loader in self.loaders.values())
            self.optimizer, self.scheduler = make_optimizer(
                encoder_params, self.model.heads.parameters(), s, steps)
            shared = [p for p in encoder_params if p.requires_grad]
            use_surgery = shared and (s.pcgrad or s.grad_diagnostics)
            self.surgery = PCGrad(shared, len(self.tasks), project=s.pcgrad,
                                  reduction=s.pcgrad_reduction, seed=s.seed) if use_surgery else None
        else:
            # seq: a separate AdamW per task, over the encoder and that task's head.
            self.task_optimizers = {
                t.name: make_optimizer(encoder_params, t.head.parameters(), s,
                                       s.epochs * len(self.loaders[t.name]))
                for t in self.tasks}

    def train_epoch_mix(self, epoch: int) -> tuple[dict, dict]:
        self.model.train()
        steps = max(len(loader) for loader in self.loaders.values())
        streams = [forever(self.loaders[t.name]) for t in self.tasks]
        totals, diagnostics = [0.0] * len(self.tasks), GradDiagnostics(self.tasks)
        for _ in self.progress(range(steps), f"epoch {epoch} mix"):
            batches = [next(stream).to(self.device) for stream in streams]
            losses, gram = mix_step(self.model, self.tasks, batches, self.optimizer, self.surgery)
            self.scheduler.step()
            totals = [t + loss for t, loss in zip(totals, losses)]
            diagnostics.add(gram)
        return ({t.name: total / steps for t, total in zip(self.tasks, totals)},
                {"grad": diagnostics.summary(), "grad_norm": diagnostics.norms()})

    def train_epoch_seq(self, epoch: int) -> tuple[dict, dict]:
        self.model.train()
        losses = {}
        order = {name: i for i, name in enumerate(self.settings.seq_order)}
        for task in sorted(self.tasks, key=lambda t: order.get(t.name, len(order))):
            optimizer, scheduler = self.task_optimizers[task.name]
            total, count = 0.0, 0
            for batch in self.progress(self.loaders[task.name], f"epoch {epoch} {task.name}"):
                batch = batch.to(self.device)
                optimizer.zero_grad(set_to_none=True)
                loss = task.loss(self.model(task.name, batch), batch.labels)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, count = total + loss.item(), count + 1
            losses[task.name] = total / max(count, 1)
        return losses, {"grad": {}}

    def progress(self, iterable, desc: str):
        return tqdm(iterable, desc=desc, leave=False, disable=not self.settings.progress,
                    dynamic_ncols=True)

    # --- evaluation and results ----------------------------------------------------------

    def evaluate(self) -> tuple[dict[str, float], dict[str, tuple[list, list]]]:
        """Dev metric per task, and the (ids, predictions) behind it."""
        dev, outputs = {}, {}
        for task in self.eval_tasks:
            ids, predictions, labels = predict(self.model, task, eval_loader(task, task.dev),
                                               self.device)
            dev[task.name] = task.metric(predictions, labels)
            outputs[task.name] = (ids, predictions)
        return dev, outputs

    def write_dev_predictions(self, outputs: dict[str, tuple[list, list]]) -> None:
        for task in self.eval_tasks:
            write_predictions(prediction_path(self.run_dir, task, "dev"), *outputs[task.name],
                              task.spec.prediction_label)

    def save(self, epoch: int, dev: dict, overall: float) -> None:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_checkpoint(self.best_path, {"model": state, "epoch": epoch, "dev": dev,
                                         "overall": overall, **self.checkpoint_extra})

    def finish(self, best_epoch: int, best: dict) -> dict:
        """Reload the best checkpoint, write its test predictions, mark the run complete."""
        self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        write_all_predictions(self.model, self.eval_tasks, self.run_dir, self.device, ("test",))
        summary = {"best_epoch": best_epoch, "best": best, "epochs": self.settings.epochs}
        write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)
        return summary


def eval_loader(task: Task, examples):
    """In file order; evaluation holds no activations, so batches can be larger."""
    return make_loader(examples, task.collate, max(task.batch_size, 32), shuffle=False)


def prediction_path(run_dir: str, task: Task, split: str) -> str:
    return os.path.join(run_dir, PREDICTIONS_DIR, f"{task.name}-{split}-output.csv")


def write_all_predictions(model, tasks: list[Task], run_dir: str, device,
                          splits: tuple[str, ...] = ("dev", "test")) -> dict:
    """Prediction files per task and split (the starter's layout); returns dev metrics."""
    dev = {}
    for task in tasks:
        for split in splits:
            examples = task.dev if split == "dev" else task.test
            if not examples:
                continue
            ids, predictions, labels = predict(model, task, eval_loader(task, examples), device)
            write_predictions(prediction_path(run_dir, task, split), ids, predictions,
                              task.spec.prediction_label)
            if split == "dev":
                dev[task.name] = task.metric(predictions, labels)
    return dev


class GradDiagnostics:
    """Per pair of tasks: the mean cosine between their encoder gradients and the fraction
    of steps in which they conflicted (negative dot product)."""

    def __init__(self, tasks: list[Task]):
        self.pairs = list(itertools.combinations(range(len(tasks)), 2))
        self.names = [f"{tasks[i].name}/{tasks[j].name}" for i, j in self.pairs]
        self.cos_sum = [0.0] * len(self.pairs)
        self.conflicts = [0] * len(self.pairs)
        self.tasks = [t.name for t in tasks]
        self.norm_sum = [0.0] * len(tasks)
        self.steps = 0

    def add(self, gram: torch.Tensor | None) -> None:
        if gram is None:
            return
        cos = gradient_cosines(gram.double())
        self.steps += 1
        for n, (i, j) in enumerate(self.pairs):
            self.cos_sum[n] += cos[i, j].item()
            self.conflicts[n] += int(gram[i, j] < 0)
        # Under Adam a task whose gradient is small next to the others' gets a small share
        # of each step's update: the norms show whether one task drowns out another.
        norms = gram.diagonal().clamp(min=0).sqrt().tolist()
        self.norm_sum = [total + norm for total, norm in zip(self.norm_sum, norms)]

    def summary(self) -> dict:
        if not self.steps:
            return {}
        return {name: {"cos": round(c / self.steps, 4), "conflict": round(k / self.steps, 4)}
                for name, c, k in zip(self.names, self.cos_sum, self.conflicts)}

    def norms(self) -> dict:
        """Mean L2 norm of each task's encoder gradient over the epoch's steps."""
        if not self.steps:
            return {}
        return {name: round(total / self.steps, 5) for name, total in zip(self.tasks, self.norm_sum)}


def format_epoch(record: dict) -> str:
    losses = " ".join(f"{k} {v:.3f}" for k, v in record["train_loss"].items())
    dev = " ".join(f"{k} {v:.3f}" for k, v in record["dev"].items())
    text = (f"epoch {record['epoch']}: train loss [{losses}] dev [{dev}] "
            f"overall {record['overall']:.3f} ({record['seconds']:.0f}s)")
    if record.get("grad_norm"):
        text += "\n  grad norm: " + " ".join(f"{k} {v:.3g}" for k, v in record["grad_norm"].items())
    for pair, stats in record["grad"].items():
        text += f"\n  grad {pair}: mean cos {stats['cos']:+.3f}, conflicts {stats['conflict']:.0%}"
    return text
