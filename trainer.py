"""Training loops shared by classifier.py and multitask_classifier.py: one shared encoder,
a head per task, and the report's training methods (section 4.3):
  seq: a full pass over each task in turn, each task with its own optimizer;
  mix: every step one batch of every task ("max_size_cycle": an epoch lasts as many
       steps as the largest task has batches; smaller tasks restart), the task gradients
       combined by an aggregator (the plain sum, PCGrad, ...; aggregators.py).
Every state a run needs to continue exactly is saved in last.pt (trainer_state.py).
"""
from __future__ import annotations

import math
import os
import signal
import time
from typing import Callable

import torch
from tqdm import tqdm

from aggregators import make_aggregator
from balancing import balanced_weights, make_balancer
from datasets import TrainStream
from diagnostics import GradDiagnostics, format_epoch
from errors import Interrupted
from evaluation import Predictions, dev_scores, overall, predict_all
from heads import MultitaskBERT
from optimizer import AdamW
from pcgrad import PCGrad
from steplog import StepLog
from runfiles import (CHECKPOINT_FILE, DIVERGED_FILE, LAST_FILE, METRICS_FILE, SUMMARY_FILE, append_jsonl,
                      read_jsonl, write_json)
from tasks import Task
from trainer_state import Diverged, NonFinite, Progress, check_finite, load_state, save_state
from utils import load_checkpoint, save_checkpoint


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


def mix_step(model: MultitaskBERT, tasks: list[Task], batches: list, optimizer,
             surgery: PCGrad | None = None) -> tuple[list[float], torch.Tensor | None]:
    """One finetune-mix step: a batch of every task, the encoder gradients summed or
    combined by `surgery`. Returns the task losses and the gradient Gram matrix. A
    non-finite loss or gradient raises NonFinite before anything is updated."""
    optimizer.zero_grad(set_to_none=True)
    losses = [task.loss(model(task.name, batch), batch.labels)
              for task, batch in zip(tasks, batches)]
    values = [loss.item() for loss in losses]
    check_finite(values, [t.name for t in tasks], "loss")
    if surgery is not None:
        gram = surgery.pc_backward(losses)  # the aggregator's combination + diagnostics
        check_finite(gram.diagonal().tolist(), [t.name for t in tasks], "gradient")
    else:
        gram = None
        torch.stack(losses).sum().backward()
    optimizer.step()
    return values, gram


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
        self.streams = {t.name: TrainStream(t.train, t.collate, t.batch_size, cfg.bucket, cfg.seed)
                        for t in tasks}
        self.eval_tasks = [t for t in tasks if t.spec.evaluated]
        self.best_path = os.path.join(run_dir, CHECKPOINT_FILE)
        self.last_path = os.path.join(run_dir, LAST_FILE)
        self.state = Progress(totals=[0.0] * len(tasks))
        self.diagnostics = GradDiagnostics(tasks)
        self.stop_signal = 0
        self.has_saved_state = False
        self.steps = StepLog(run_dir, [t.name for t in tasks], cfg.log_every_steps, cfg.tensorboard)
        self.setup_optimizers()

    # --- setup ---------------------------------------------------------------------------

    def setup_optimizers(self) -> None:
        cfg = self.cfg
        encoder_params = list(self.model.encoder.parameters())
        if cfg.mode == "mix":
            self.steps_per_epoch = max(len(s) for s in self.streams.values())
            optimizer, scheduler = make_optimizer(encoder_params, self.model.heads.parameters(),
                                                  cfg, cfg.epochs * self.steps_per_epoch)
            self.optimizers = {"mix": (optimizer, scheduler)}
            shared = [p for p in encoder_params if p.requires_grad]
            self.aggregator = make_aggregator(cfg.aggregator, len(self.tasks), seed=cfg.seed,
                                              **cfg.aggregator_options())
            self.balancer = make_balancer(cfg.balance, len(self.tasks))
            self.combined = cfg.aggregator != "sum" or cfg.balance != "none"
            self.surgery = PCGrad(shared, len(self.tasks), combine=self.combine,
                                  sparse_rows=[self.model.encoder.word_embedding.weight]) \
                if shared and (self.combined or cfg.grad_diagnostics) else None
        else:
            # seq: a separate AdamW per task, over the encoder and that task's head.
            self.optimizers = {
                t.name: make_optimizer(encoder_params, t.head.parameters(), cfg,
                                       cfg.epochs * len(self.streams[t.name]))
                for t in self.tasks}
            self.aggregator = self.balancer = self.surgery = None

    def step_surgery(self, global_step: int) -> PCGrad | None:
        """The per-task gradient pass for the step after `global_step` steps, or None for
        the plain summed backward: every step for an aggregator or a balancing; for the
        diagnostics alone, steps N, 2N, ... (1-based, as steps.jsonl numbers them, so that
        its records fall on sampled steps). A pure function of the step: resume stays exact."""
        if self.surgery is None or self.combined:
            return self.surgery
        return self.surgery if (global_step + 1) % self.cfg.grad_diagnostics_every == 0 else None

    def combine(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return balanced_weights(gram, losses, self.aggregator, self.balancer)

    # --- the loop ------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict:
        if resume:
            load_state(self, self.last_path)
            self.restore_metrics_line()
            self.steps.drop_after(self.state.global_step)
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.state.epoch <= self.cfg.epochs:
                start = time.time()
                losses, grad_stats = (self.train_epoch_mix if self.cfg.mode == "mix"
                                      else self.train_epoch_seq)(self.state.epoch)
                self.end_epoch(losses, grad_stats, time.time() - start)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.finish()

    def restore_metrics_line(self) -> None:
        """A stop between last.pt and the metrics line of its epoch: write the line now."""
        path = os.path.join(self.run_dir, METRICS_FILE)
        record = self.state.record
        done = read_jsonl(path) if os.path.exists(path) else []
        if record and not any(r.get("epoch") == record["epoch"] for r in done):
            append_jsonl(path, record)

    def on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # acted on after the current step (after_step)

    def after_step(self) -> None:
        """Save every --save_every_steps steps, and on a stop signal (then stop)."""
        every = self.cfg.save_every_steps
        if self.stop_signal or (every and self.state.global_step % every == 0):
            save_state(self, self.last_path)
        if self.stop_signal:
            raise Interrupted(f"interrupted at epoch {self.state.epoch}, step {self.state.step}; "
                              f"state saved. Continue with: --resume {self.run_dir}",
                              self.stop_signal)

    def train_epoch_mix(self, epoch: int) -> tuple[dict, dict]:
        self.model.train()
        streams = [self.streams[t.name] for t in self.tasks]
        if self.state.step == 0:
            for stream in streams:
                stream.new_pass()
        optimizer, scheduler = self.optimizers["mix"]
        bar = self.progress(range(self.state.step, self.steps_per_epoch), f"epoch {epoch} mix",
                            initial=self.state.step, total=self.steps_per_epoch)
        for _ in bar:
            batches = [stream.next().to(self.device) for stream in streams]
            losses, gram = self.guarded(mix_step, self.model, self.tasks, batches, optimizer,
                                        self.step_surgery(self.state.global_step))
            self.state.totals = [t + loss for t, loss in zip(self.state.totals, losses)]
            self.diagnostics.add(gram)
            self.log_step(bar, scheduler, losses, gram)
            scheduler.step()
            self.state.advance()
            self.after_step()
        steps = self.steps_per_epoch
        return ({t.name: total / steps for t, total in zip(self.tasks, self.state.totals)},
                {"grad": self.diagnostics.summary(), "grad_norm": self.diagnostics.norms()})

    def train_epoch_seq(self, epoch: int) -> tuple[dict, dict]:
        self.model.train()
        order = {name: i for i, name in enumerate(self.cfg.seq_order.split(","))}
        ordered = sorted(range(len(self.tasks)), key=lambda i: order.get(self.tasks[i].name, len(order)))
        for position in range(self.state.seq_task, len(ordered)):
            self.train_pass(self.tasks[ordered[position]], ordered[position], epoch)
            self.state.seq_task, self.state.step = position + 1, 0
        return ({t.name: self.state.totals[i] / max(len(self.streams[t.name]), 1)
                 for i, t in ((i, self.tasks[i]) for i in ordered)}, {"grad": {}})

    def train_pass(self, task: Task, index: int, epoch: int) -> None:
        """seq mode: one pass over a task's training data (from the saved step on resume)."""
        stream, (optimizer, scheduler) = self.streams[task.name], self.optimizers[task.name]
        if self.state.step == 0:
            stream.new_pass()
        bar = self.progress(range(self.state.step, len(stream)), f"epoch {epoch} {task.name}",
                            initial=self.state.step, total=len(stream))
        for _ in bar:
            losses, _ = self.guarded(mix_step, self.model, [task], [stream.next().to(self.device)],
                                     optimizer)
            self.state.totals[index] += losses[0]
            self.log_step(bar, scheduler, [losses[0] if i == index else math.nan
                                           for i in range(len(self.tasks))], None)
            scheduler.step()
            self.state.advance()
            self.after_step()

    def log_step(self, bar, scheduler, losses: list[float], gram) -> None:
        """steps.jsonl (and TensorBoard) every --log_every_steps steps; the bar shows the
        running task losses."""
        record = self.steps.add(self.state.global_step + 1, self.state.epoch,
                                scheduler.get_last_lr()[0], losses, gram)
        if record is not None and self.cfg.progress:
            bar.set_postfix({k: f"{v:.3f}" for k, v in record["loss"].items() if math.isfinite(v)})

    def guarded(self, step: Callable, *args):
        try:
            return step(*args)
        except NonFinite as err:
            stop = Diverged(err, self)
            write_json(os.path.join(self.run_dir, DIVERGED_FILE), stop.record)  # report.py reads it
            raise stop from None

    def progress(self, iterable, desc: str, **kwargs):
        return tqdm(iterable, desc=desc, leave=False, disable=not self.cfg.progress,
                    dynamic_ncols=True, **kwargs)

    # --- epochs, evaluation and results --------------------------------------------------

    def end_epoch(self, losses: dict, grad_stats: dict, seconds: float) -> None:
        """Evaluate; keep the best; then save the state of the next epoch's start before
        the epoch's metrics line, so metrics.jsonl never lists an epoch a resume would redo."""
        epoch = self.state.epoch
        predictions = predict_all(self.model, self.eval_tasks, self.device, ("dev",))
        dev = dev_scores(predictions)
        score = overall(dev)
        record = {"epoch": epoch, "train_loss": losses, "dev": dev, "overall": score,
                  **grad_stats, "seconds": round(seconds, 1)}
        self.log(format_epoch(record))
        if score > self.state.best:
            self.state.best, self.state.best_epoch = score, epoch
            self.state.best_dev = {**dev, "overall": score}
            self.save_best(epoch, dev, score)
            self.write(predictions)
        self.state.next_epoch(record, len(self.tasks))
        self.diagnostics = GradDiagnostics(self.tasks)
        if self.balancer is not None:
            self.balancer.end_epoch(list(losses.values()))
        save_state(self, self.last_path)
        append_jsonl(os.path.join(self.run_dir, METRICS_FILE), record)
        if self.stop_signal:
            self.after_step()

    def write(self, predictions: list[Predictions]) -> None:
        for p in predictions:
            p.write(self.run_dir)

    def save_best(self, epoch: int, dev: dict, score: float) -> None:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_checkpoint(self.best_path, {"model": state, "epoch": epoch, "dev": dev,
                                         "overall": score, **self.checkpoint_extra})

    def finish(self) -> dict:
        """Reload the best checkpoint, write its test predictions, mark the run complete."""
        self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        self.write(predict_all(self.model, self.eval_tasks, self.device, ("test",)))
        summary = {"best_epoch": self.state.best_epoch, "best": self.state.best_dev,
                   "epochs": self.cfg.epochs}
        write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)
        if os.path.exists(self.last_path):  # complete: nothing left to resume
            os.remove(self.last_path)
        return summary
