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


def weighted_sum(rows: torch.Tensor, weights: list[float], out: torch.Tensor) -> None:
    """out = sum_k weights[k] rows[k] for (K, P) rows, as K elementwise passes: torch.mv
    over the transposed (P, K) view took ~1.3x as long on a 2-core CPU (12-14 against 9-11
    ms for MiniLM's (3, 11M) dense rows, a microbenchmark); both are memory-bound."""
    torch.mul(rows[0], weights[0], out=out)
    for row, weight in zip(rows[1:], weights[1:]):
        out.add_(row, alpha=weight)


class SparseRows:
    """The task gradients of a 2-D shared parameter whose gradient is mostly zero rows:
    the word embedding, where only the batch's tokens get one (~1k of 30k rows for MiniLM,
    but half of the encoder's parameters). Its part of the buffer still holds each task's
    gradient exactly, but the Gram matrix and the weighted sum read only the rows that some
    task's gradient reaches, found from the gradient itself. Exact: a row that is zero for
    every task adds nothing to either. Invariant: outside `rows[k]`, task k's view is zero
    (as after the buffer's allocation); outside `update_rows`, the update is zero."""

    def __init__(self, task_views: list[torch.Tensor], update_view: torch.Tensor):
        self.task_views, self.update_view = task_views, update_view  # K x (V, H), (V, H)
        empty = torch.zeros(0, dtype=torch.long, device=update_view.device)
        self.rows = [empty] * len(task_views)  # per task: the rows it holds, (n_k,)
        self.update_rows = empty
        self.union = empty  # this step's rows of any task, (n,)

    def store(self, k: int, grad: torch.Tensor | None) -> None:
        """Task k's gradient (V, H) into its view; None: the task did not reach it."""
        if grad is None:
            self.store_rows(k, self.rows[k][:0], grad)
            return
        low, high = torch.aminmax(grad, dim=1)  # one read, no (V, H) temporary
        rows = ((low != 0) | (high != 0)).nonzero().squeeze(1)  # NaN counts as nonzero
        self.store_rows(k, rows, grad.index_select(0, rows))

    def store_rows(self, k: int, rows: torch.Tensor, values: torch.Tensor | None) -> None:
        """Task k's gradient given as its nonzero rows (distinct, (n_k,)) and their values
        (n_k, H): the rest of the task's view is zero."""
        view = self.task_views[k]
        view.index_fill_(0, self.rows[k], 0)  # last step's rows: now all of it is zero
        if len(rows):
            view.index_copy_(0, rows, values)
        self.rows[k] = rows

    def gather(self) -> torch.Tensor:
        """This step's live rows of every task, flat: (K, n * H)."""
        self.union = torch.cat(self.rows).unique()
        return torch.stack([view.index_select(0, self.union) for view in self.task_views]).flatten(1)

    def write_update(self, live: torch.Tensor, weights: list[float]) -> None:
        """update = sum_k w[k] g_k from gather()'s (K, n * H)."""
        combined = live.new_empty(live.shape[1])
        weighted_sum(live, weights, combined)
        self.update_view.index_fill_(0, self.update_rows, 0)
        self.update_view.index_copy_(0, self.union, combined.view(len(self.union), -1))
        self.update_rows = self.union


class PCGrad:
    """Per-task backward passes into preallocated flat buffers, then PCGrad (or, with
    project=False, the plain sum) written back as the shared parameters' gradients.
    gram() and apply(weights) are the two halves of the combination, for any Gram-space
    weighting (engine/combiner.py drives them with the aggregators).

    Only `shared_params` (the encoder) take part: each head belongs to one task, gets its
    task's gradient unchanged through ordinary accumulation, and stays out of the
    combination. Use with any torch optimizer: pc_backward(losses), then optimizer.step().
    `reduce` (e.g. a data-parallel all-reduce) runs on the (K, P) buffer before the Gram
    matrix, so every process combines the same gradients.
    """

    def __init__(self, shared_params: Iterable[torch.nn.Parameter], num_tasks: int,
                 project: bool = True, reduction: str = "sum", seed: int = 0,
                 reduce: Callable[[torch.Tensor], None] | None = None,
                 sparse_rows: Iterable[torch.nn.Parameter] = ()):
        """`sparse_rows`: shared 2-D parameters whose gradients are mostly zero rows (the
        word embedding), handled by SparseRows; not with `reduce`, which may fill rows."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        params = [p for p in shared_params if p.requires_grad]
        sparse = [p for p in sparse_rows if p.requires_grad]
        if not all(any(p is q for q in params) and p.dim() == 2 for p in sparse) or (sparse and reduce):
            raise ValueError("sparse_rows must be 2-D shared parameters, and not used with reduce")
        # The sparse parameters last: the others are one dense slice of each row.
        self.params = [p for p in params if not any(p is q for q in sparse)] + sparse
        self.dense_size = sum(p.numel() for p in self.params[:len(self.params) - len(sparse)])
        self.num_tasks = num_tasks
        self.project = project
        self.reduction = reduction
        self.rng = random.Random(seed)
        self.reduce = reduce
        size = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else torch.device("cpu")
        # Allocated once: a fresh (K, P) buffer every step costs tens of ms for MiniLM.
        # Every step overwrites each row (backward), so it is never zeroed.
        self.grads = torch.zeros(num_tasks, size, device=device)  # (K, P)
        self.update = torch.zeros(size, device=device)  # (P,)
        self.task_views = [self._views(self.grads[k]) for k in range(num_tasks)]
        self.update_views = self._views(self.update)
        first = len(self.params) - len(sparse)
        self.sparse = [SparseRows([views[i] for views in self.task_views], self.update_views[i])
                       for i in range(first, len(self.params))]
        self._live: list[torch.Tensor] = []  # this step's sparse rows, from gram() to apply()

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def pc_backward(self, losses: Sequence[torch.Tensor], shared_graph: bool = False) -> torch.Tensor:
        """Backward each task's loss, write the PCGrad update (or the plain sum) as the
        shared gradients, and return the (K, K) Gram matrix of the task gradients.
        `shared_graph=True` when the losses share part of one graph (one forward pass)."""
        if len(losses) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {len(losses)}")
        for k, loss in enumerate(losses):
            self.backward(k, loss, retain_graph=shared_graph and k < len(losses) - 1)
        gram = self.gram()
        self.apply(combine_weights(gram.double().cpu(), self.rng, self.project, self.reduction))
        return gram.detach().cpu()

    def gram(self, grad_scale: float = 1.0) -> torch.Tensor:
        """The Gram matrix of the rows (after `reduce`), (K, K). `grad_scale`: the factor
        every loss was multiplied by (fp16 loss scaling): the matrix is of the true
        gradients, since not every combination is scale-invariant."""
        if self.reduce is not None:
            self.reduce(self.grads)
        self._live = [rows.gather() for rows in self.sparse]  # each (K, n * H)
        dense = self.grads[:, :self.dense_size]  # (K, D)
        return sum((gram_matrix(part) for part in self._live), gram_matrix(dense)) / grad_scale ** 2

    def apply(self, weights: torch.Tensor) -> None:
        """sum_k w[k] g_k written as the shared parameters' gradients (after gram(); the
        update keeps any loss scale, for the scaler to unscale)."""
        weights = weights.tolist()
        weighted_sum(self.grads[:, :self.dense_size], weights, self.update[:self.dense_size])
        for rows, part in zip(self.sparse, self._live):
            rows.write_update(part, weights)
        for p, view in zip(self.params, self.update_views):
            p.grad = view

    def backward(self, k: int, loss: torch.Tensor, accumulate: bool = False,
                 retain_graph: bool = False) -> None:
        """Task k's shared gradients, written into row k of the buffer (`accumulate`: added
        to what the row holds, for micro-batches; dense rows only).

        Each parameter's gradient is copied into the row as soon as autograd has it (a
        post-accumulate hook, while it is still in cache), and p.grad is reset. This
        writes the row once: accumulating into a zeroed row instead costs a zeroing pass
        over the (K, P) buffer and a read of it, ~1 GB of memory traffic a step for MiniLM.
        A parameter that gets no gradient from this task has its view zeroed."""
        if accumulate and self.sparse:
            raise ValueError("accumulating micro-batches needs dense rows: no sparse_rows")
        filled = [False] * len(self.params)

        def store(index: int):
            def hook(p: torch.Tensor) -> None:
                self.store_grad(k, index, p.grad, accumulate)
                p.grad = None
                filled[index] = True
            return hook
        for p in self.params:
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(store(i)) for i, p in enumerate(self.params)]
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            for handle in handles:
                handle.remove()
        for index, done in enumerate(filled):
            if not done:
                self.store_grad(k, index, None, accumulate)

    def sparse_part(self, index: int) -> SparseRows | None:
        """Parameter `index`'s SparseRows, or None: a dense part, task k's in task_views[k]."""
        first_sparse = len(self.params) - len(self.sparse)
        return self.sparse[index - first_sparse] if index >= first_sparse else None

    def store_grad(self, k: int, index: int, grad: torch.Tensor | None, accumulate: bool) -> None:
        """Parameter `index`'s gradient from task k (None: it got none) into row k."""
        sparse, view = self.sparse_part(index), self.task_views[k][index]
        if sparse is not None:
            sparse.store(k, grad)
        elif grad is None:
            if not accumulate:
                view.zero_()
        elif accumulate:
            view.add_(grad)
        else:
            view.copy_(grad)
