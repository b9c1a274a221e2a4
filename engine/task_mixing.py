"""How a finetune-mix step splits its examples among the tasks (--sampling). Torch-free:
the configs check their options here, and the counts are plain arithmetic.

cycle (the default): every step one hand-set batch of every task; an epoch lasts as many
    steps as the largest task has batches (smaller tasks restart). Not handled here.
temperature: task k's share of a step is p_k proportional to n_k^(1/T) (n_k: its training
    examples): T=1 proportional to size, T=2 the square-root sampling of Stickland &
    Murray, T=inf uniform.
annealed: p_k proportional to n_k^alpha, alpha = 1 - 0.8 (e - 1) / (E - 1) in epoch
    e = 1..E of E: proportional in the first epoch, nearly uniform (alpha 0.2) in the last.
    A. C. Stickland and I. Murray, "BERT and PALs: Projected Attention Layers for
    Efficient Adaptation in Multi-Task Learning", ICML 2019, section 4 ("annealed
    sampling"; the authors' run_multi_task.py computes the same from the 0-based epoch).
    With E = 1 the one epoch is the schedule's first (alpha 1).

Every aggregator needs each step's per-task gradients, so a step never samples ONE task:
it holds S examples (all processes and micro-batches together), c_k of task k, every
c_k >= 1 (step_counts). The counts are a pure function of (seed, step, epoch): every
process computes the same ones, a resumed run recomputes them, and nothing of the
sampling but the tasks' stream positions needs saving.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

from engine.errors import ConfigError

ANNEAL_FROM, ANNEAL_SPAN = 1.0, 0.8  # alpha from 1 down to 1 - 0.8 = 0.2 (the paper's)


def parse_temperature(text: str) -> float:
    """--sampling_temperature: a positive number, or inf (uniform)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # NaN fails too
        raise ConfigError(f"--sampling_temperature must be a positive number or inf, got {text!r}")
    return value


def check_sampling(sampling: str, mode: str, temperature: str) -> None:
    """The --sampling options of a multitask config (ConfigError naming the flag). The
    step's size is checked where the number of processes is known (check_step_size)."""
    parse_temperature(temperature)
    if sampling != "cycle" and mode != "mix":
        raise ConfigError(f"--sampling {sampling} needs --mode mix (a step of every task)")


def check_step_size(per_process: int, scale: int, num_tasks: int) -> None:
    """A sampled step of per_process x scale (micro-batches x processes) examples must hold
    one of every task."""
    if per_process * scale < num_tasks:
        raise ConfigError(f"--sampling_batch_size {per_process} x {scale} (micro-batches x "
                          f"processes) examples a step cannot hold one example of each of the "
                          f"{num_tasks} tasks; give at least {-(-num_tasks // scale)}")


def annealed_alpha(epoch: int, epochs: int) -> float:
    """Stickland & Murray's exponent in epoch `epoch` (1-based) of `epochs`."""
    if epochs <= 1:
        return ANNEAL_FROM
    return ANNEAL_FROM - ANNEAL_SPAN * (epoch - 1) / (epochs - 1)


def probabilities(sizes: Sequence[int], exponent: float) -> list[float]:
    """p_k proportional to sizes[k] ** exponent (0: uniform), in logs: no overflow."""
    logs = [exponent * math.log(n) for n in sizes]
    top = max(logs)
    weights = [math.exp(x - top) for x in logs]
    total = sum(weights)
    return [w / total for w in weights]


def step_counts(total: int, probs: Sequence[float], seed: int, step: int) -> list[int]:
    """The examples of each task in step `step`: `total` split as total x p, every task at
    least one. Each count is total x p_k rounded down or up, up with probability its
    fractional part (systematic sampling: one uniform draw u, the points u, u+1, ... over
    the fractional parts laid end to end), so E[c_k] = total x p_k exactly and no count is
    more than one from it. A multinomial would add a variance of total x p_k (1 - p_k),
    noise in the small tasks' batch sizes that the rounding does not need; a deterministic
    largest-remainder rounding would round the same task down forever. The floor of one
    (a task with total x p_k < 1 gets 1, taken from the largest count) over-represents
    such a task: needs total >= len(probs)."""
    rng = random.Random(f"{seed}/mix/{step}")
    shares = [total * p for p in probs]
    counts = [math.floor(s) for s in shares]
    rest = total - sum(counts)
    u = rng.random()

    def points_below(x: float) -> int:  # how many of u, u+1, ..., u+rest-1 are < x
        return min(rest, max(0, math.ceil(x - u)))
    edge = 0.0
    for k, share in enumerate(shares):
        low, edge = edge, (edge + share - counts[k] if k < len(shares) - 1 else rest)
        counts[k] += points_below(edge) - points_below(low)
    for k in range(len(counts)):
        if counts[k] == 0:
            donor = max(range(len(counts)), key=counts.__getitem__)
            counts[donor], counts[k] = counts[donor] - 1, 1
    return counts


class TaskMixer:
    """The sampled mix steps of a run: `total` examples a step (all processes and
    micro-batches together) over tasks of `sizes` training examples. An epoch is
    ceil(sum(sizes) / total) steps: about as many examples as the data holds. `plan`
    fixes a step's counts (`counts`), which each task's stream then takes."""

    def __init__(self, sizes: Sequence[int], total: int, sampling: str, temperature: float,
                 epochs: int, seed: int):
        if sampling not in ("temperature", "annealed"):
            raise ValueError(f"no sampled steps for --sampling {sampling}")
        if total < len(sizes) or min(sizes) < 1:
            raise ValueError(f"{total} examples a step cannot hold one of each of {len(sizes)} tasks")
        self.sizes, self.total, self.sampling = list(sizes), total, sampling
        self.temperature, self.epochs, self.seed = temperature, epochs, seed
        self.steps_per_epoch = math.ceil(sum(self.sizes) / total)
        self.counts: list[int] = []

    def exponent(self, epoch: int) -> float:
        if self.sampling == "annealed":
            return annealed_alpha(epoch, self.epochs)
        return 1.0 / self.temperature  # inf: 0, uniform

    def probabilities(self, epoch: int) -> list[float]:
        return probabilities(self.sizes, self.exponent(epoch))

    def plan(self, global_step: int, epoch: int) -> list[int]:
        """Step `global_step` (0-based, over the whole run) of epoch `epoch` (1-based)."""
        self.counts = step_counts(self.total, self.probabilities(epoch), self.seed, global_step)
        return self.counts

    def describe(self, names: Sequence[str]) -> str:
        shares = ", ".join(f"{n} {p:.3f}" for n, p in zip(names, self.probabilities(1)))
        how = ("annealed (alpha 1 -> 0.2 over the epochs)" if self.sampling == "annealed"
               else f"temperature {self.temperature:g}")
        return (f"  sampling {how}: {self.total} examples a step, {self.steps_per_epoch} steps "
                f"an epoch; epoch 1 shares: {shares}")
