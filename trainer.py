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
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from datasets import Batch, make_loader
from evaluation import Predictions, dev_scores, overall, predict_all
from heads import MultitaskBERT
from optimizer import AdamW
from pcgrad import PCGrad, gradient_cosines
from runfiles import CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, append_jsonl, write_json
from tasks import Task
from utils import load_checkpoint, save_checkpoint


def forever(loader) -> Iterator[Batch]:
    """Restart a loader when exhausted (a fresh shuffle each time), unlike itertools.cycle."""
    while True:
        yield from loader


def make_optimizer(encoder_params, head_params, cfg, total_steps: int):
    """AdamW with the encoder at lr and the freshly initialised heads at head_lr (or lr),
    both on one warmup/decay schedule."""
    groups = [{"params": [p for p in params if p.requires_grad], "lr": lr}
              for params, lr in ((encoder_params, cfg.lr), (head_params, cfg.head_lr or cfg.lr))]
    optimizer = AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                      weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "linear":
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

    def __init__(self, model: MultitaskBERT, tasks: list[Task], cfg, device: torch.device,
                 run_dir: str, checkpoint_extra: dict, log: Callable[[str], None] = print):
        """`cfg`: a run.RunConfig of the script (the trainer reads its fields directly)."""
        self.model, self.tasks, self.cfg = model.to(device), tasks, cfg
        self.device, self.run_dir, self.log = device, run_dir, log
        self.checkpoint_extra = checkpoint_extra
        self.model.train_encoder(not cfg.freeze_encoder)
        self.loaders = {t.name: make_loader(t.train, t.collate, t.batch_size, shuffle=True,
                                            bucket=cfg.bucket, seed=cfg.seed)
                        for t in tasks}
        self.eval_tasks = [t for t in tasks if t.spec.evaluated]
        self.best_path = os.path.join(run_dir, CHECKPOINT_FILE)

    # --- training ------------------------------------------------------------------------

    def fit(self) -> dict:
        train_epoch = self.train_epoch_mix if self.cfg.mode == "mix" else self.train_epoch_seq
        self.setup_optimizers()
        best, best_epoch, best_dev = -math.inf, 0, {}
        for epoch in range(1, self.cfg.epochs + 1):
            start = time.time()
            losses, grad_stats = train_epoch(epoch)
            predictions = predict_all(self.model, self.eval_tasks, self.device, ("dev",))
            dev = dev_scores(predictions)
            score = overall(dev)
            record = {"epoch": epoch, "train_loss": losses, "dev": dev, "overall": score,
                      **grad_stats, "seconds": round(time.time() - start, 1)}
            append_jsonl(os.path.join(self.run_dir, METRICS_FILE), record)
            self.log(format_epoch(record))
            if score > best:
                best, best_epoch, best_dev = score, epoch, {**dev, "overall": score}
                self.save(epoch, dev, score)
                self.write(predictions)
        return self.finish(best_epoch, best_dev)

    def setup_optimizers(self) -> None:
        s = self.cfg
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
        order = {name: i for i, name in enumerate(self.cfg.seq_order.split(","))}
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
        return tqdm(iterable, desc=desc, leave=False, disable=not self.cfg.progress,
                    dynamic_ncols=True)

    # --- evaluation and results ----------------------------------------------------------

    def write(self, predictions: list[Predictions]) -> None:
        for p in predictions:
            p.write(self.run_dir)

    def save(self, epoch: int, dev: dict, overall: float) -> None:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_checkpoint(self.best_path, {"model": state, "epoch": epoch, "dev": dev,
                                         "overall": overall, **self.checkpoint_extra})

    def finish(self, best_epoch: int, best: dict) -> dict:
        """Reload the best checkpoint, write its test predictions, mark the run complete."""
        self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        self.write(predict_all(self.model, self.eval_tasks, self.device, ("test",)))
        summary = {"best_epoch": best_epoch, "best": best, "epochs": self.cfg.epochs}
        write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)
        return summary


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
