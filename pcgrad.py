"""PCGrad: gradient surgery for multi-task learning (Yu et al., 2020; the report's
Algorithm 1).

For each task i, over the other tasks j in random order: if g_i . g_j < 0, project g_i
onto the normal plane of the original g_j, g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j.
The update is the sum (or mean) of the projected gradients.

Every projected g_i stays in the span of the original task gradients, so the whole
surgery runs on their K x K Gram matrix: g_i' = sum_m C[i, m] g_m, and
g_i' . g_j = (C G)[i, j]. The P-dimensional vectors are touched twice: once for the
Gram matrix, once for the final weighted sum.
"""
from __future__ import annotations

import random
from typing import Callable, Iterable, Sequence

import torch


def project_coefficients(gram: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """C (K, K) with g_i' = sum_m C[i, m] g_m, from the Gram matrix G[i, j] = g_i . g_j."""
    num_tasks = gram.shape[0]
    coeffs = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = coeffs[i] @ gram[:, j]  # g_i' . g_j
            # A zero g_j has no direction to project off (and would divide by zero).
            if dot < 0 and gram[j, j] > 0:
                coeffs[i, j] -= dot / gram[j, j]
    return coeffs


def combine_weights(gram: torch.Tensor, rng: random.Random, project: bool = True,
                    reduction: str = "sum") -> torch.Tensor:
    """w (K,) such that the update is sum_m w[m] g_m."""
    num_tasks = gram.shape[0]
    coeffs = project_coefficients(gram, rng) if project else torch.eye(num_tasks, dtype=gram.dtype)
    weights = coeffs.sum(0)
    return weights / num_tasks if reduction == "mean" else weights


def gram_matrix(grads: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """G = grads @ grads.T for (K, P) with P in the millions, computed as a batch of
    (K, block) products summed. One (K, P) @ (P, K) matmul is ~3.5x slower on a CPU
    (BLAS handles the skinny shape badly) and, summing 22M fp32 products in one
    accumulator, loses about 3 significant digits; the blocked sum keeps them."""
    num_tasks, size = grads.shape
    blocks = size // block
    body = grads[:, :blocks * block].view(num_tasks, blocks, block).transpose(0, 1)  # (n, K, block)
    tail = grads[:, blocks * block:]  # (K, < block)
    return torch.bmm(body, body.transpose(1, 2)).sum(0) + tail @ tail.T  # (K, K)


def project_conflicting(grads: torch.Tensor, rng: random.Random, reduction: str = "sum",
                        project: bool = True) -> torch.Tensor:
    """The PCGrad update from per-task flat gradients (K, P) -> (P,)."""
    gram = gram_matrix(grads).double()
    weights = combine_weights(gram, rng, project, reduction)
    return weights.to(grads.dtype) @ grads


def gradient_cosines(gram: torch.Tensor) -> torch.Tensor:
    """Cosine between each pair of task gradients, (K, K); 0 where a gradient is zero."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp(min=1e-30), torch.zeros_like(gram))


Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gram, losses) -> w (K,)


class PCGrad:
    """Per-task backward passes into preallocated flat buffers, then PCGrad (or, with
    project=False, the plain sum; or any Gram-space `combine`, see aggregators.py) written
    back as the shared parameters' gradients.

    Only `shared_params` (the encoder) take part: each head belongs to one task, gets its
    task's gradient unchanged through ordinary accumulation, and stays out of the
    combination. Use with any torch optimizer: pc_backward(losses), then optimizer.step().
    `reduce` (e.g. a data-parallel all-reduce) runs on the (K, P) buffer before the Gram
    matrix, so every process combines the same gradients.
    """

    def __init__(self, shared_params: Iterable[torch.nn.Parameter], num_tasks: int,
                 project: bool = True, reduction: str = "sum", seed: int = 0,
                 combine: Combine | None = None,
                 reduce: Callable[[torch.Tensor], None] | None = None):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.params = [p for p in shared_params if p.requires_grad]
        self.num_tasks = num_tasks
        self.project = project
        self.reduction = reduction
        self.rng = random.Random(seed)
        self.combine = combine or (lambda gram, _: combine_weights(gram, self.rng, project, reduction))
        self.reduce = reduce
        size = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        # Allocated once: a fresh (K, P) buffer every step costs tens of ms for MiniLM.
        self.grads = torch.zeros(num_tasks, size, device=device)  # (K, P)
        self.update = torch.zeros(size, device=device)  # (P,)
        self.task_views = [self._views(self.grads[k]) for k in range(num_tasks)]
        self.update_views = self._views(self.update)
        self.last_weights: torch.Tensor | None = None

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def pc_backward(self, losses: Sequence[torch.Tensor], shared_graph: bool = False) -> torch.Tensor:
        """Backward each task's loss, combine the shared gradients, and return the
        (K, K) Gram matrix of the task gradients for diagnostics. `shared_graph=True`
        when the losses share part of one graph (one forward pass for all tasks)."""
        if len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {len(losses)}")
        for k, loss in enumerate(losses):
            self.backward(k, loss, retain_graph=shared_graph and k < len(losses) - 1)
        return self.combine_rows([loss.item() for loss in losses])

    def backward(self, k: int, loss: torch.Tensor, accumulate: bool = False,
                 retain_graph: bool = False) -> None:
        """Task k's shared gradients into row k of the buffer; `accumulate` adds them to
        what the row holds (gradient accumulation over micro-batches)."""
        if not accumulate:
            self.grads[k].zero_()
        for p, view in zip(self.params, self.task_views[k]):
            p.grad = view  # autograd accumulates in place: the gradient lands in the row
        loss.backward(retain_graph=retain_graph)

    def combine_rows(self, losses: Sequence[float], grad_scale: float = 1.0) -> torch.Tensor:
        """The rows' combination written as the shared parameters' gradients; returns the
        Gram matrix. `grad_scale`: the factor every loss was multiplied by (fp16 loss
        scaling): the weights come from the true Gram matrix (not every method is
        scale-invariant), and the written update stays scaled, for the scaler to unscale."""
        if self.reduce is not None:
            self.reduce(self.grads)
        gram = gram_matrix(self.grads) / grad_scale ** 2  # (K, K)
        values = torch.tensor(list(losses), dtype=torch.float64)
        if grad_scale != 1.0 and not torch.isfinite(gram).all():
            # an fp16 overflow: the scaler skips this step (the update holds inf too)
            weights = torch.ones(self.num_tasks, dtype=torch.float64)
        else:
            weights = self.combine(gram.double().cpu(), values)
        self.last_weights = weights
        torch.mv(self.grads.T, weights.to(self.grads), out=self.update)
        for p, view in zip(self.params, self.update_views):
            p.grad = view
        return gram.detach().cpu()
