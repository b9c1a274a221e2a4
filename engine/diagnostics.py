"""Gradient diagnostics of finetune-mix: how the tasks' encoder gradients relate (cosine,
conflicts) and how large each is, from the Gram matrix the combination computes anyway;
and the per-epoch log line."""
from __future__ import annotations

import itertools

import torch

from pcgrad import gradient_cosines


class GradDiagnostics:
    """Per pair of tasks: the mean cosine between their encoder gradients and the fraction
    of steps in which they conflicted (negative dot product)."""

    def __init__(self, tasks: list):
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

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in DIAGNOSTIC_FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for name in DIAGNOSTIC_FIELDS:
            setattr(self, name, state[name])

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
    if "dev_ema" in record:
        ema = " ".join(f"{k} {v:.3f}" for k, v in record["dev_ema"].items())
        text += f"\n  ema weights: dev [{ema}] overall {record['overall_ema']:.3f}"
    if record.get("grad_norm"):
        text += "\n  grad norm: " + " ".join(f"{k} {v:.3g}" for k, v in record["grad_norm"].items())
    for pair, stats in record["grad"].items():
        text += f"\n  grad {pair}: mean cos {stats['cos']:+.3f}, conflicts {stats['conflict']:.0%}"
    return text


# What a checkpoint keeps of the running sums (GradDiagnostics.state_dict / load_state_dict).
DIAGNOSTIC_FIELDS = ("cos_sum", "conflicts", "norm_sum", "steps")
