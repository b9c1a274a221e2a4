"""Where a mix step's time goes: wall time (time.perf_counter, no profiler) of the phases of
the real engine.step.train_step, marked from outside through its public parts, so that
changes inside the step (a packed forward, say) keep being measured:
    forward      the TaskLosses call (encoder, heads, losses): its forward pre-hook and hook
    backward     from the end of the forward to the next phase: the backward pass(es),
                 for an aggregator with its per-task gradient rows filled by their hooks
    combination  Combiner.combine (Gram matrix, aggregator/balancing weights, weighted sum)
    optimizer    the optimizer's step (its step pre- and post-hooks)
    other        the rest of the step: zero_grad, data to the device, the step context
On a GPU every mark synchronizes, which removes some overlap: the phases' total is timed
apart from the plain ms/step rows for that reason.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from bench.limits import sync

PHASES = ("forward", "backward", "combination", "optimizer", "other")


class PhaseClock:
    """Adds the time since the last mark to the phase running until then."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spent: dict[str, float] = defaultdict(float)
        self.phase, self.last = "other", 0.0

    def mark(self, phase: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.spent[self.phase] += now - self.last
        self.phase, self.last = phase, now

    def take(self) -> dict[str, float]:
        """The phases of the steps timed since the last take, in seconds."""
        spent, self.spent = dict(self.spent), defaultdict(float)
        return {name: spent.get(name, 0.0) for name in PHASES}

    @contextmanager
    def watch(self, losses: torch.nn.Module, optimizer, combiner=None):
        """Times one step run inside the block. `losses`: the step context's TaskLosses."""
        handles = [losses.register_forward_pre_hook(lambda *_: self.mark("forward")),
                   losses.register_forward_hook(lambda *_: self.mark("backward")),
                   optimizer.register_step_pre_hook(lambda *_: self.mark("optimizer")),
                   optimizer.register_step_post_hook(lambda *_: self.mark("other"))]
        if combiner is not None:
            combine = combiner.combine

            def timed_combine(*args, **kwargs):
                self.mark("combination")
                try:
                    return combine(*args, **kwargs)
                finally:
                    self.mark("other")
            combiner.combine = timed_combine  # an instance attribute: deleted below
        sync(self.device)
        self.phase, self.last = "other", time.perf_counter()
        try:
            yield self
        finally:
            self.mark("other")
            for handle in handles:
                handle.remove()
            if combiner is not None:
                del combiner.combine


def phase_lines(phases: dict[str, dict[str, float]]) -> list[str]:
    """A table: per method, each phase's mean ms per step and its share of the total."""
    lines = [f"{'method':>30}  " + "  ".join(f"{name:>15}" for name in PHASES) + "  total ms"]
    for method, spent in phases.items():
        total = sum(spent.values())
        cells = [f"{1000 * spent[name]:8.1f} {spent[name] / total:5.1%}" if spent[name] else
                 f"{'-':>15}" for name in PHASES]
        lines.append(f"{method:>30}  " + "  ".join(f"{cell:>15}" for cell in cells)
                     + f"  {1000 * total:8.0f}")
    return lines
