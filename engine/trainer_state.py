"""What a run needs to continue exactly where it stopped (last.pt), and how it stops when
training diverges. last.pt holds plain tensors, numbers, lists and dicts only, so
`torch.load(..., weights_only=True)` reads it."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.errors import UserError
from engine.distributed import gather_objects
from utils import load_checkpoint, save_checkpoint

STATE_FORMAT = 1


@dataclass
class Progress:
    """Where training stands, and the running sums of the epoch in progress."""
    epoch: int = 1  # the epoch in progress (1-based)
    step: int = 0  # steps done in it (seq: in the pass of the task in progress)
    seq_task: int = 0  # seq: position in the task order of the task in progress
    global_step: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    best_dev: dict = field(default_factory=dict)
    best_weights: str = "live"  # --ema: which weights best.pt holds ("live" or "ema")
    totals: list = field(default_factory=list)  # per task: the epoch's summed losses
    record: dict | None = None  # the last finished epoch's metrics line

    def advance(self) -> None:
        self.step += 1
        self.global_step += 1

    def next_epoch(self, record: dict, num_tasks: int) -> None:
        self.epoch, self.step, self.seq_task, self.record = self.epoch + 1, 0, 0, record
        self.totals = [0.0] * num_tasks


class NonFinite(Exception):
    """A step produced a NaN or infinite loss or gradient (raised before the update)."""

    def __init__(self, what: str, task: str, value: float):
        super().__init__(f"{what} became {value} for task {task}")
        self.what, self.task, self.value = what, task, value


def check_finite(values: list[float], names: list[str], what: str) -> None:
    for value, name in zip(values, names):
        if not math.isfinite(value):
            raise NonFinite(what, name, value)


class Diverged(UserError):
    """Training diverged: the run stops at that step with one line (exit 2)."""

    def __init__(self, err: NonFinite, trainer):
        state, cfg = trainer.state, trainer.cfg
        last = trainer.last_path if trainer.has_saved_state else "none yet"
        message = (f"{err.what} became {err.value} at epoch {state.epoch}, step {state.step + 1}, "
                   f"task {err.task} (lr {cfg.lr:g}); last good checkpoint: {last}")
        super().__init__(message)
        self.record = {"message": message, "epoch": state.epoch, "step": state.step + 1,
                       "task": err.task}


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path: str, state: dict, dist, meta: dict) -> None:
    """A Trainer's state_dict with every process's random state and `meta` (the run's
    config and its fingerprint, which --resume checks), atomically. Under torchrun
    every process calls it (each one's random state is gathered); rank 0 writes."""
    ranks_rng = gather_objects(rng_states())  # dropout draws differ between processes
    if not dist.is_main:
        return
    save_checkpoint(path, {"format": STATE_FORMAT, **state, "rng": ranks_rng[0],
                           "rng_ranks": ranks_rng, "world_size": dist.world_size,
                           **meta})


def load_state(path: str, dist) -> dict:
    """last.pt, checked to be of this process count (restore_rng sets its random state)."""
    saved = load_checkpoint(path, ("format", "model", "optimizers", "progress"))
    world_size = saved.get("world_size", 1)
    if world_size != dist.world_size:
        raise UserError(f"{path} was saved by {world_size} process(es); resume it with as many "
                        f"(torchrun --nproc_per_node ...), not {dist.world_size}: the "
                        "global batch, and so the run, depends on it")
    return saved


def restore_rng(saved: dict, rank: int) -> None:
    """This process's random state from last.pt: last, after everything else is loaded
    (a training stream's position is restored by drawing, as its pass began)."""
    set_rng_states(saved["rng_ranks"][rank] if "rng_ranks" in saved else saved["rng"])
