"""An exponential moving average of a model's trainable weights (--ema DECAY), updated
after every optimizer step:

    shadow = d * shadow + (1 - d) * param,  d = min(DECAY, (1 + n) / (10 + n))

n being the updates made before this one. The warm-up of d (TensorFlow's
ExponentialMovingAverage with num_updates; timm's ModelEmaV2 has none) matters here because
the shadow starts at the weights before training, freshly initialised heads included: with
DECAY 0.999 and no warm-up, a few hundred steps later the shadow would still hold most of
that random start, and the epoch's EMA evaluation would mean little. With it, d is 0.1 at
the first step and reaches DECAY after ~9 / (1 - DECAY) steps.

Frozen weights (requires_grad False) have no shadow: their average is themselves. Under
torchrun every process updates its own shadow from its own parameters; those are equal on
every process after each step (the gradients are averaged, the optimizers identical), so
the shadows are too, with no communication.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        torch._foreach_mul_(self.shadow, decay)
        torch._foreach_add_(self.shadow, self.params, alpha=1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the shadow (exact copies: twice is nothing)."""
        for param, shadow in zip(self.params, self.shadow):
            live = param.detach().clone()
            param.copy_(shadow)
            shadow.copy_(live)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own after it."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {name: s.detach().cpu() for name, s in zip(self.names, self.shadow)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for name, shadow in zip(self.names, self.shadow):
            shadow.copy_(state["shadow"][name])
