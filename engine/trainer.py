"""Training loops shared by classifier.py and multitask_classifier.py: one shared encoder,
a head per task, and the report's training methods (section 4.3):
  seq: a full pass over each task in turn, each task with its own optimizer;
  mix: every step one batch of every task ("max_size_cycle": an epoch lasts as many
       steps as the largest task has batches; smaller tasks restart), the task gradients
       combined by an aggregator (the plain sum, PCGrad, ...; aggregators.py); or, with
       --sampling temperature / annealed, each step's examples split among the tasks at
       random (task_mixing.py), every task still in every step.
Every state a run needs to continue exactly is saved in last.pt (trainer_state.py).
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Callable

from tqdm import tqdm

from engine.build import Parts
from engine.combiner import Combiner
from engine.configs import RunConfig
from engine.diagnostics import GradDiagnostics, format_epoch
from engine.distributed import Dist, broadcast_parameters_
from engine.ema import EMA
from engine.errors import Interrupted
from engine.fingerprint import FINGERPRINT
from engine.runfiles import (CHECKPOINT_FILE, DIVERGED_FILE, LAST_FILE, METRICS_FILE,
                             SUMMARY_FILE, append_jsonl, read_jsonl, write_json)
from engine.step import train_step
from engine.steplog import StepLog
from engine.tasks import Task
from engine.trainer_state import (Diverged, NonFinite, Progress, load_state, restore_rng,
                                  save_state)
from evaluation import Predictions, dev_scores, overall, predict_all
from utils import load_checkpoint, save_checkpoint


class Trainer:
    """Trains, evaluates each epoch, keeps the best checkpoint by the mean dev metric, and
    writes metrics (JSON lines) and the best model's predictions into `run_dir`."""

    def __init__(self, parts: Parts, cfg: RunConfig, dist: Dist, run_dir: str,
                 checkpoint_extra: dict, log: Callable[[str], None] = print):
        """`parts`: built by engine/build.py. Under torchrun every process runs a Trainer;
        only the main one (rank 0) writes."""
        self.model, self.tasks, self.streams = parts.model, parts.tasks, parts.streams
        self.optimizers, self.combiner, self.ctx = parts.optimizers, parts.combiner, parts.ctx
        self.steps_per_epoch, self.mixer = parts.steps_per_epoch, parts.mixer
        self.cfg, self.dist, self.device, self.run_dir = cfg, dist, dist.device, run_dir
        self.log = log if dist.is_main else (lambda *_: None)
        self.checkpoint_extra = checkpoint_extra
        self.eval_tasks = [t for t in self.tasks if t.spec.evaluated]
        self.best_path = os.path.join(run_dir, CHECKPOINT_FILE)
        self.last_path = os.path.join(run_dir, LAST_FILE)
        self.state = Progress(totals=[0.0] * len(self.tasks))
        self.diagnostics = GradDiagnostics(self.tasks)
        self.stop_signal = 0  # a signal this process received
        self.agreed_stop = 0  # the signal any process received, as of the last step
        self.has_saved_state = False
        self.steps = StepLog(run_dir, [t.name for t in self.tasks], cfg.log_every_steps
                             if dist.is_main else 0, cfg.tensorboard and dist.is_main)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema else None

    # --- what last.pt holds --------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything that decides the rest of the run but the random state (saved beside
        it by trainer_state.save_state)."""
        scaler = self.ctx.scaler
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizers": {name: opt.state_dict() for name, (opt, _) in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, (_, s) in self.optimizers.items()},
            "streams": {name: stream.state_dict() for name, stream in self.streams.items()},
            "progress": asdict(self.state),
            "diagnostics": self.diagnostics.state_dict(),
            "steplog": self.steps.state_dict(),
            **(self.combiner.state_dict() if self.combiner is not None else {}),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        for name, (optimizer, scheduler) in self.optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
            scheduler.load_state_dict(saved["schedulers"][name])
        for name, stream in self.streams.items():
            stream.load_state_dict(saved["streams"][name])
        self.state = Progress(**saved["progress"])
        self.diagnostics.load_state_dict(saved["diagnostics"])
        self.steps.load_state_dict(saved["steplog"])
        if self.combiner is not None:
            self.combiner.load_state_dict(saved)
        if self.ctx.scaler is not None:
            self.ctx.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        restore_rng(saved, self.dist.rank)

    def save(self) -> None:
        meta = {"config": self.checkpoint_extra["config"],
                FINGERPRINT: self.checkpoint_extra.get(FINGERPRINT)}  # what --resume checks
        save_state(self.last_path, self.state_dict(), self.dist, meta)
        self.has_saved_state = True

    # --- the loop ------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict:
        if resume:
            self.load_state_dict(load_state(self.last_path, self.dist))
            self.has_saved_state = True
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
            self.save()
        stop = stop or self.stop_now()  # one process: a signal during the save
        if stop:
            raise Interrupted(f"interrupted at epoch {self.state.epoch}, step {self.state.step}; "
                              f"state saved. Continue with: --resume {self.run_dir}", stop)

    def step(self, tasks: list[Task], streams: list, optimizer,
             combiner: Combiner | None) -> tuple[list, object]:
        drawn = [stream.next_step() for stream in streams]
        losses, gram, self.agreed_stop = self.guarded(train_step, self.ctx, tasks, drawn, optimizer,
                                                      combiner, self.stop_signal)
        if self.ema is not None:
            self.ema.update()
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
            if self.mixer is not None:  # the step's task counts: a function of the step
                self.mixer.plan(self.state.global_step, epoch)
            combiner = self.combiner.for_step(self.state.global_step) if self.combiner else None
            losses, gram = self.step(self.tasks, streams, optimizer, combiner)
            self.state.totals = [t + loss for t, loss in zip(self.state.totals, losses)]
            self.diagnostics.add(gram)
            self.log_step(bar, scheduler, losses, gram,
                          combiner.last_weights if combiner is not None else None)
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

    def log_step(self, bar, scheduler, losses: list[float], gram, weights=None) -> None:
        """steps.jsonl (and TensorBoard) every --log_every_steps steps; the bar shows the
        running task losses. `weights`: the task weights the step's combination applied
        (a CPU tensor already: no device sync), None for a plain summed step."""
        record = self.steps.add(self.state.global_step + 1, self.state.epoch,
                                scheduler.get_last_lr()[0], losses, gram, weights)
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
        weights = "live"
        if self.ema is not None:
            weights, dev, score, predictions = self.evaluate_ema(record, dev, score, predictions)
        self.log(format_epoch(record))
        if score > self.state.best:
            self.state.best, self.state.best_epoch = score, epoch
            self.state.best_dev, self.state.best_weights = {**dev, "overall": score}, weights
            self.save_best(epoch, dev, score, weights)
            self.write(predictions)
        self.state.next_epoch(record, len(self.tasks))
        self.diagnostics = GradDiagnostics(self.tasks)
        if self.combiner is not None:
            self.combiner.end_epoch(list(losses.values()))
        self.save()
        if self.dist.is_main:
            append_jsonl(os.path.join(self.run_dir, METRICS_FILE), record)
        _, stop = self.ctx.agree([], self.stop_signal)  # a signal during the evaluation
        if stop:
            self.after_step(stop)

    def evaluate_ema(self, record: dict, dev: dict, score: float, predictions: list) -> tuple:
        """The averaged weights on dev too (the record's dev_ema, overall_ema): returns the
        better of the two ("ema" or "live", dev, overall, predictions); a tie keeps live."""
        with self.ema.applied():
            averaged = predict_all(self.model, self.eval_tasks, self.device, ("dev",), self.dist)
        record.update(dev_ema=dev_scores(averaged), overall_ema=overall(dev_scores(averaged)))
        return (("ema", record["dev_ema"], record["overall_ema"], averaged)
                if record["overall_ema"] > score else ("live", dev, score, predictions))

    def write(self, predictions: list[Predictions]) -> None:
        for p in predictions if self.dist.is_main else []:
            p.write(self.run_dir)

    def save_best(self, epoch: int, dev: dict, score: float, weights: str = "live") -> None:
        """best.pt: the live weights, or (weights "ema") the averaged ones."""
        if not self.dist.is_main:
            return
        which = {"weights": weights} if self.ema is not None else {}
        with self.ema.applied() if weights == "ema" else nullcontext():
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            save_checkpoint(self.best_path, {"model": state, "epoch": epoch, "dev": dev,
                                             "overall": score, **which, **self.checkpoint_extra})

    def finish(self) -> dict:
        """Reload the best checkpoint, write its test predictions, mark the run complete."""
        if self.dist.is_main:  # only rank 0 has the folder (each machine its own disk, maybe)
            self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        broadcast_parameters_(self.model)
        self.write(predict_all(self.model, self.eval_tasks, self.device, ("test",), self.dist))
        summary = {"best_epoch": self.state.best_epoch, "best": self.state.best_dev,
                   "epochs": self.cfg.epochs,
                   **({"weights": self.state.best_weights} if self.ema is not None else {})}
        if self.dist.is_main:
            write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)
            if os.path.exists(self.last_path):  # complete: nothing left to resume
                os.remove(self.last_path)
        return summary
