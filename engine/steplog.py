"""Live per-step logs of a run: steps.jsonl (appended and flushed every N steps, never
rewritten while the run goes on) and, optionally, the same as TensorBoard events."""
from __future__ import annotations

import math
import os

from engine.errors import ConfigError
from engine.runfiles import STEPS_FILE, TENSORBOARD_DIR, atomic_write, read_jsonl, to_json


class StepLog:
    """Averages each task's loss over `every` steps, then writes one record with the
    step, the learning rate, the mean task weights of the steps that combined the task
    gradients (combiner.py's `last_weights`, after balancing: "weights", absent when no step
    of the window combined them, as in a plain summed step, whose weights are all 1) and,
    when the record's step computed a Gram matrix, gradient norms and cosines."""

    def __init__(self, run_dir: str, task_names: list[str], every: int, tensorboard: bool = False):
        self.path = os.path.join(run_dir, STEPS_FILE)
        self.names, self.every = task_names, every
        self.sums, self.count = [0.0] * len(task_names), 0
        self.weight_sums, self.weighted = [0.0] * len(task_names), 0
        self.writer = open_tensorboard(run_dir) if tensorboard else None

    def state_dict(self) -> dict:
        """The window in progress: a resumed run's records equal an uninterrupted run's."""
        return {"sums": list(self.sums), "count": self.count,
                "weight_sums": list(self.weight_sums), "weighted": self.weighted}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count = list(state["sums"]), state["count"]
        # a last.pt from before the weights were logged: its window's weights are lost
        self.weight_sums = list(state.get("weight_sums", [0.0] * len(self.names)))
        self.weighted = state.get("weighted", 0)

    def drop_after(self, step: int) -> None:
        """On resume: the lines of steps the resumed run will do again."""
        if os.path.exists(self.path):
            kept = [r for r in read_jsonl(self.path) if r["step"] <= step]
            atomic_write(self.path, lambda f: f.writelines(to_json(r) + "\n" for r in kept))

    def add(self, step: int, epoch: int, lr: float, losses: list[float], gram=None,
            weights=None) -> dict | None:
        """Returns the record when one is written (every `every` steps). `weights`: the
        task weights this step's combination applied (a CPU tensor), None if none ran."""
        self.sums = [s + loss for s, loss in zip(self.sums, losses)]
        self.count += 1
        if weights is not None:
            self.weight_sums = [s + w for s, w in zip(self.weight_sums, weights.tolist())]
            self.weighted += 1
        if not self.every or self.count < self.every:
            return None
        record = {"step": step, "epoch": epoch, "lr": lr,
                  "loss": {n: s / self.count for n, s in zip(self.names, self.sums)}}
        if self.weighted:
            record["weights"] = {n: s / self.weighted for n, s in zip(self.names, self.weight_sums)}
        if gram is not None:
            norms = gram.diagonal().clamp(min=0).sqrt().tolist()
            record["grad_norm"] = dict(zip(self.names, norms))
            record["cos"] = {f"{self.names[i]}/{self.names[j]}":
                             gram[i, j].item() / max(norms[i] * norms[j], 1e-30)
                             for i in range(len(norms)) for j in range(i + 1, len(norms))}
        self.write(record)
        self.sums, self.count = [0.0] * len(self.names), 0
        self.weight_sums, self.weighted = [0.0] * len(self.names), 0
        return record

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(to_json(record) + "\n")
            f.flush()
        if self.writer is not None:
            for group in ("loss", "weights", "grad_norm", "cos"):
                for name, value in record.get(group, {}).items():
                    if math.isfinite(value):
                        self.writer.add_scalar(f"{group}/{name}", value, record["step"])
            self.writer.add_scalar("lr", record["lr"], record["step"])
            self.writer.flush()


def require_tensorboard():
    """The SummaryWriter class; checked before the run folder is made (engine/run._train)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install -c "
                          "requirements.txt -r requirements-extras.txt") from None
    return SummaryWriter


def open_tensorboard(run_dir: str):
    return require_tensorboard()(os.path.join(run_dir, TENSORBOARD_DIR))
