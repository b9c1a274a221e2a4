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

from engine.aggregators import make_aggregator
from engine.balancing import balanced_weights, make_balancer
from datasets import TrainStream
from engine.distributed import Dist, all_reduce_mean_, broadcast_parameters_
from engine.diagnostics import GradDiagnostics, format_epoch
from engine.errors import Interrupted
from evaluation import Predictions, dev_scores, overall, predict_all
from engine.heads import MultitaskBERT
from optimizer import AdamW
from engine.step import make_context, train_step
from pcgrad import PCGrad
from engine.steplog import StepLog
from engine.runfiles import (CHECKPOINT_FILE, DIVERGED_FILE, LAST_FILE, METRICS_FILE, SUMMARY_FILE, append_jsonl,
                      read_jsonl, write_json)
from engine.tasks import Task
from engine.trainer_state import Diverged, NonFinite, Progress, load_state, save_state
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


class Trainer:
    """Trains, evaluates each epoch, keeps the best checkpoint by the mean dev metric, and
    writes metrics (JSON lines) and the best model's predictions into `run_dir`."""

    def __init__(self, model: MultitaskBERT, tasks: list[Task], cfg, dist: Dist,
                 run_dir: str, checkpoint_extra: dict, log: Callable[[str], None] = print):
        """`cfg`: a run.RunConfig of the script (the trainer reads its fields directly).
        Under torchrun every process runs a Trainer; only the main one (rank 0) writes."""
        self.model, self.tasks, self.cfg = model.to(dist.device), tasks, cfg
        self.dist, self.device, self.run_dir = dist, dist.device, run_dir
        self.log = log if dist.is_main else (lambda *_: None)
        self.checkpoint_extra = checkpoint_extra
        self.model.train_encoder(not cfg.freeze_encoder)
        self.streams = {t.name: TrainStream(t.train, t.collate, t.batch_size, cfg.bucket, cfg.seed,
                                            cfg.grad_accumulation, dist.rank, dist.world_size,
                                            pin=self.device.type == "cuda")
                        for t in tasks}
        self.eval_tasks = [t for t in tasks if t.spec.evaluated]
        self.best_path = os.path.join(run_dir, CHECKPOINT_FILE)
        self.last_path = os.path.join(run_dir, LAST_FILE)
        self.state = Progress(totals=[0.0] * len(tasks))
        self.diagnostics = GradDiagnostics(tasks)
        self.stop_signal = 0  # a signal this process received
        self.agreed_stop = 0  # the signal any process received, as of the last step
        self.has_saved_state = False
        self.steps = StepLog(run_dir, [t.name for t in tasks], cfg.log_every_steps if dist.is_main
                             else 0, cfg.tensorboard and dist.is_main)
        self.setup_optimizers()
        fp16 = model.autocast == torch.float16
        self.ctx = make_context(model, tasks, dist, fp16, find_unused=cfg.mode == "seq")
        if self.surgery is not None:
            self.surgery.reduce = all_reduce_mean_ if dist.enabled else None
            in_buffer = {id(p) for p in self.surgery.params}
            self.ctx.unshared = [p for p in model.parameters() if id(p) not in in_buffer]
            self.ctx.trainable = [p for p in model.parameters() if p.requires_grad]

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
            wanted = shared and (self.combined or cfg.grad_diagnostics)
            self.surgery = self.gradient_buffer(shared) if wanted else None
        else:
            # seq: a separate AdamW per task, over the encoder and that task's head.
            self.optimizers = {
                t.name: make_optimizer(encoder_params, t.head.parameters(), cfg,
                                       cfg.epochs * len(self.streams[t.name]))
                for t in self.tasks}
            self.aggregator = self.balancer = self.surgery = None

    def gradient_buffer(self, shared: list) -> PCGrad:
        # The word embedding as sparse rows on one process without micro-batches only: an
        # all-reduce or a second micro-batch may reach rows this process's first did not.
        sparse = self.cfg.grad_accumulation == 1 and not self.dist.enabled
        return PCGrad(shared, len(self.tasks), combine=self.combine,
                      sparse_rows=[self.model.encoder.word_embedding.weight] if sparse else [])

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
            if self.dist.is_main:
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
        if record and self.dist.is_main and not any(r.get("epoch") == record["epoch"] for r in done):
            append_jsonl(path, record)

    def on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # acted on after the current step (after_step)

    def stop_now(self) -> int:
        """The stop signal to act on now: on one process, any received so far; under
        torchrun, the one agreed in the last step (every process stops at the same step)."""
        return self.agreed_stop if self.dist.enabled else self.stop_signal

    def after_step(self, stop: int = 0) -> None:
        """Save every --save_every_steps steps, and on a stop signal (then stop)."""
        stop = stop or self.stop_now()
        every = self.cfg.save_every_steps
        if stop or (every and self.state.global_step % every == 0):
            save_state(self, self.last_path)
        stop = stop or self.stop_now()  # one process: a signal during the save
        if stop:
            raise Interrupted(f"interrupted at epoch {self.state.epoch}, step {self.state.step}; "
                              f"state saved. Continue with: --resume {self.run_dir}", stop)

    def step(self, tasks: list[Task], streams: list, optimizer, surgery) -> tuple[list, object]:
        drawn = [stream.next_step() for stream in streams]
        losses, gram, self.agreed_stop = self.guarded(train_step, self.ctx, tasks, drawn, optimizer,
                                                      surgery, self.stop_signal)
        return losses, gram

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
            losses, gram = self.step(self.tasks, streams, optimizer,
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
            (loss,), _ = self.step([task], [stream], optimizer, None)
            self.state.totals[index] += loss
            self.log_step(bar, scheduler, [loss if i == index else math.nan
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
            if self.dist.is_main:  # report.py reads it
                write_json(os.path.join(self.run_dir, DIVERGED_FILE), stop.record)
            raise stop from None

    def progress(self, iterable, desc: str, **kwargs):
        return tqdm(iterable, desc=desc, leave=False, disable=not (self.cfg.progress and self.dist.is_main),
                    dynamic_ncols=True, **kwargs)

    # --- epochs, evaluation and results --------------------------------------------------

    def end_epoch(self, losses: dict, grad_stats: dict, seconds: float) -> None:
        """Evaluate; keep the best; then save the state of the next epoch's start before
        the epoch's metrics line, so metrics.jsonl never lists an epoch a resume would redo."""
        epoch = self.state.epoch
        predictions = predict_all(self.model, self.eval_tasks, self.device, ("dev",), self.dist)
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
        if self.dist.is_main:
            append_jsonl(os.path.join(self.run_dir, METRICS_FILE), record)
        _, stop = self.ctx.agree([], self.stop_signal)  # a signal during the evaluation
        if stop:
            self.after_step(stop)

    def write(self, predictions: list[Predictions]) -> None:
        for p in predictions if self.dist.is_main else []:
            p.write(self.run_dir)

    def save_best(self, epoch: int, dev: dict, score: float) -> None:
        if not self.dist.is_main:
            return
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_checkpoint(self.best_path, {"model": state, "epoch": epoch, "dev": dev,
                                         "overall": score, **self.checkpoint_extra})

    def finish(self) -> dict:
        """Reload the best checkpoint, write its test predictions, mark the run complete."""
        if self.dist.is_main:  # only rank 0 has the folder (each machine its own disk, maybe)
            self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        broadcast_parameters_(self.model)
        self.write(predict_all(self.model, self.eval_tasks, self.device, ("test",), self.dist))
        summary = {"best_epoch": self.state.best_epoch, "best": self.state.best_dev,
                   "epochs": self.cfg.epochs}
        if self.dist.is_main:
            write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)
            if os.path.exists(self.last_path):  # complete: nothing left to resume
                os.remove(self.last_path)
        return summary
