"""The gradient combination of a finetune-mix step, as one object: the per-task gradient
buffer (pcgrad.PCGrad's rows), the aggregator (aggregators.py), the loss balancer
(balancing.py) and the sampling of the gradient diagnostics. train_step asks it for the
buffer, then for the combined update; nothing calls back into the Trainer."""
from __future__ import annotations

from typing import Sequence

import torch

from engine.aggregators import make_aggregator
from engine.balancing import balanced_weights, make_balancer
from engine.configs import Combination
from engine.distributed import Dist, all_reduce_mean_
from pcgrad import PCGrad


class Combiner:
    """`buffer`: the (K, P) per-task rows of the shared parameters, or None when every step
    is a plain summed backward (one task; or the sum without diagnostics)."""

    def __init__(self, spec: Combination, buffer: PCGrad | None, num_tasks: int, seed: int):
        self.spec, self.buffer = spec, buffer
        self.aggregator = make_aggregator(spec.aggregator, num_tasks, seed=seed, **dict(spec.options))
        self.balancer = make_balancer(spec.balance, num_tasks)
        self.last_weights: torch.Tensor | None = None

    @classmethod
    def build(cls, spec: Combination, shared: list, num_tasks: int, seed: int, dist: Dist,
              micro_batches: int, sparse_rows: Sequence = ()) -> "Combiner":
        """`shared`: the trainable encoder parameters. The word embedding (`sparse_rows`) is
        kept as sparse rows on one process without micro-batches only: an all-reduce or a
        second micro-batch may reach rows this process's first did not."""
        wanted = shared and (spec.per_task_every_step or spec.diagnostics_every)
        sparse = list(sparse_rows) if micro_batches == 1 and not dist.enabled else []
        buffer = PCGrad(shared, num_tasks, sparse_rows=sparse,
                        reduce=all_reduce_mean_ if dist.enabled else None) if wanted else None
        return cls(spec, buffer, num_tasks, seed)

    @property
    def params(self) -> list:
        """The parameters whose gradients the buffer combines."""
        return self.buffer.params if self.buffer is not None else []

    def for_step(self, global_step: int) -> "Combiner | None":
        """Itself for a step that needs the per-task gradients, None for a plain summed
        backward: every step for an aggregator or a balancing; for the diagnostics alone,
        steps N, 2N, ... (1-based, as steps.jsonl numbers them). A pure function of the
        step: resume stays exact."""
        if self.buffer is None or self.spec.per_task_every_step:
            return self if self.buffer is not None else None
        return self if (global_step + 1) % self.spec.diagnostics_every == 0 else None

    def backward(self, k: int, loss: torch.Tensor, accumulate: bool = False) -> None:
        self.buffer.backward(k, loss, accumulate=accumulate)

    def combine(self, losses: Sequence[float], grad_scale: float = 1.0) -> torch.Tensor:
        """The weighted sum of the rows as the shared gradients; returns the Gram matrix
        (of the unscaled gradients: `grad_scale` is fp16's loss scale)."""
        gram = self.buffer.gram(grad_scale)
        if grad_scale != 1.0 and not torch.isfinite(gram).all():
            # an fp16 overflow: the scaler skips this step (the update holds inf too)
            weights = torch.ones(len(losses), dtype=torch.float64)
        else:
            values = torch.tensor(list(losses), dtype=torch.float64)
            weights = balanced_weights(gram.double().cpu(), values, self.aggregator, self.balancer)
        self.last_weights = weights
        self.buffer.apply(weights)
        return gram.detach().cpu()

    def end_epoch(self, mean_losses: Sequence[float]) -> None:
        self.balancer.end_epoch(list(mean_losses))

    def state_dict(self) -> dict:
        return {"aggregator": self.aggregator.state_dict(), "balancer": self.balancer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.balancer.load_state_dict(state["balancer"])
