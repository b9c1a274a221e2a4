"""What a run needs to continue exactly where it stopped (last.pt), and how it stops when
training diverges. last.pt holds plain tensors, numbers, lists and dicts only, so
`torch.load(..., weights_only=True)` reads it."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from engine.errors import UserError
from engine.distributed import gather_objects
from engine.fingerprint import FINGERPRINT
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


def save_state(trainer, path: str) -> None:
    """Everything that decides the rest of the run, atomically. Under torchrun every
    process calls it (each one's random state is gathered); rank 0 writes."""
    ranks_rng = gather_objects(rng_states())  # dropout draws differ between processes
    if not trainer.dist.is_main:
        return
    parts = {"aggregator": trainer.aggregator, "balancer": trainer.balancer}
    save_checkpoint(path, {
        "format": STATE_FORMAT,
        "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "optimizers": {name: opt.state_dict() for name, (opt, _) in trainer.optimizers.items()},
        "schedulers": {name: s.state_dict() for name, (_, s) in trainer.optimizers.items()},
        "streams": {name: stream.state_dict() for name, stream in trainer.streams.items()},
        "progress": asdict(trainer.state),
        "diagnostics": trainer.diagnostics.state_dict(),
        "steplog": trainer.steps.state_dict(),
        **{name: part.state_dict() for name, part in parts.items() if part is not None},
        "rng": ranks_rng[0],
        "rng_ranks": ranks_rng,
        "world_size": trainer.dist.world_size,
        "config": trainer.checkpoint_extra["config"],
        FINGERPRINT: trainer.checkpoint_extra.get(FINGERPRINT),  # what --resume checks
    })
    trainer.has_saved_state = True


def load_state(trainer, path: str) -> None:
    saved = load_checkpoint(path, ("format", "model", "optimizers", "progress"))
    world_size = saved.get("world_size", 1)
    if world_size != trainer.dist.world_size:
        raise UserError(f"{path} was saved by {world_size} process(es); resume it with as many "
                        f"(torchrun --nproc_per_node ...), not {trainer.dist.world_size}: the "
                        "global batch, and so the run, depends on it")
    trainer.model.load_state_dict(saved["model"])
    for name, (optimizer, scheduler) in trainer.optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][name])
        scheduler.load_state_dict(saved["schedulers"][name])
    for name, stream in trainer.streams.items():
        stream.load_state_dict(saved["streams"][name])
    trainer.state = Progress(**saved["progress"])
    trainer.diagnostics.load_state_dict(saved["diagnostics"])
    trainer.steps.load_state_dict(saved["steplog"])
    for name in ("aggregator", "balancer"):
        part = getattr(trainer, name)
        if part is not None and name in saved:
            part.load_state_dict(saved[name])
    set_rng_states(saved["rng_ranks"][trainer.dist.rank] if "rng_ranks" in saved else saved["rng"])
    trainer.has_saved_state = True
