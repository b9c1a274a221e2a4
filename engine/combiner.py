"""The gradient combination of a finetune-mix step, as one object: the per-task gradient
buffer (pcgrad.PCGrad's rows), the aggregator (aggregators.py), the loss balancer
(balancing.py) and the sampling of the gradient diagnostics. train_step asks it for the
buffer, then for the combined update; nothing calls back into the Trainer. A loss-only
combination (an aggregator and a balancer that read no Gram matrix: the sum or RLW, balanced
or not by uncertainty, DWA or FAMO) needs no rows outside the diagnostics steps: its weights
come from the step's losses, before one backward of sum_k w_k L_k (LossWeights)."""
from __future__ import annotations

from typing import Sequence

import torch

from engine.aggregators import make_aggregator
from engine.balancing import balanced_weights, make_balancer
from engine.configs import Combination
from engine.distributed import Dist, all_reduce_mean_
from pcgrad import PCGrad


class Combiner:
    """`buffer`: the (K, P) per-task rows of the shared parameters, or None when no step
    needs them (one task; or a loss-only combination without diagnostics).
    `loss_only`: the steps without diagnostics take their weights from the losses
    (LossWeights); only on one micro-batch, whose losses are all known before its backward."""

    def __init__(self, spec: Combination, buffer: PCGrad | None, num_tasks: int, seed: int,
                 micro_batches: int = 1):
        self.spec, self.buffer = spec, buffer
        self.aggregator = make_aggregator(spec.aggregator, num_tasks, seed=seed, **dict(spec.options))
        self.balancer = make_balancer(spec.balance, num_tasks)
        self.loss_only = (spec.per_task_every_step and micro_batches == 1
                          and not self.aggregator.reads_gram and not self.balancer.reads_gram)
        self.last_weights: torch.Tensor | None = None

    @classmethod
    def build(cls, spec: Combination, shared: list, num_tasks: int, seed: int, dist: Dist,
              micro_batches: int, sparse_rows: Sequence = ()) -> "Combiner":
        """`shared`: the trainable encoder parameters. The word embedding (`sparse_rows`) is
        kept as sparse rows on one process without micro-batches only: an all-reduce or a
        second micro-batch may reach rows this process's first did not."""
        combiner = cls(spec, None, num_tasks, seed, micro_batches)
        combiner.loss_only = combiner.loss_only and bool(shared)
        every_step = spec.per_task_every_step and not combiner.loss_only
        if shared and (every_step or spec.diagnostics_every):
            sparse = list(sparse_rows) if micro_batches == 1 and not dist.enabled else []
            combiner.buffer = PCGrad(shared, num_tasks, sparse_rows=sparse,
                                     reduce=all_reduce_mean_ if dist.enabled else None)
        return combiner

    @property
    def params(self) -> list:
        """The parameters whose gradients the buffer combines."""
        return self.buffer.params if self.buffer is not None else []

    def for_step(self, global_step: int) -> "Combiner | LossWeights | None":
        """Itself for a step that needs the per-task gradients: every step for an aggregator
        or a balancing that reads the Gram matrix, else the diagnostics' steps N, 2N, ...
        (1-based, as steps.jsonl numbers them). The other steps: LossWeights for a weighted
        loss-only combination, None for the plain sum. A pure function of the step: resume
        stays exact."""
        diagnosed = (self.spec.diagnostics_every
                     and (global_step + 1) % self.spec.diagnostics_every == 0)
        if self.loss_only and not diagnosed:
            return LossWeights(self)
        if self.buffer is None or not (diagnosed or self.spec.per_task_every_step):
            return None
        return self

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

    def weigh(self, losses: Sequence[float]) -> torch.Tensor:
        """A loss-only combination's weights (K,) from the step's losses, no Gram matrix."""
        values = torch.tensor(list(losses), dtype=torch.float64)
        self.last_weights = balanced_weights(None, values, self.aggregator, self.balancer)
        return self.last_weights

    def end_epoch(self, mean_losses: Sequence[float]) -> None:
        self.balancer.end_epoch(list(mean_losses))

    def state_dict(self) -> dict:
        return {"aggregator": self.aggregator.state_dict(), "balancer": self.balancer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.balancer.load_state_dict(state["balancer"])


class LossWeights:
    """A step of a loss-only combination outside the diagnostics: train_step takes the
    weights from the step's (all-reduced) losses and runs ONE backward of sum_k w_k L_k, a
    plain step's cost. The rows' path gives the same update up to float rounding (it sums
    the weighted task gradients in another order)."""

    def __init__(self, combiner: Combiner):
        self.combiner = combiner

    def weigh(self, losses: Sequence[float]) -> torch.Tensor:
        return self.combiner.weigh(losses)

    @property
    def last_weights(self) -> torch.Tensor | None:
        return self.combiner.last_weights
