"""The word embedding's gradient, built from the rows a step reaches only.

MiniLM's word embedding is 30,522 x 384 (half of the encoder's parameters), but a step's
batches reach a few hundred of its rows. torch's embedding backward allocates a zeroed
dense (V, H) gradient for every lookup (three a mix step: one per task's forward), and
autograd adds them up; on a CPU each fresh 47 MB allocation also page-faults in. Here
each lookup's backward returns its reached rows as a coalesced sparse tensor (autograd
merges them row by row), and a hook writes the sum into one persistent dense (V, H)
gradient that only ever had the previous step's rows to clear.

Exact: the optimizer still sees the same dense gradient, every row of it (unreached rows
are 0, as before), so AdamW's moments still decay, decoupled weight decay still applies,
and nothing needs catching up. The numbers are bitwise torch's: a row's sum over one
lookup's positions is taken in position order from 0, as embedding_dense_backward does,
and lookups are added in autograd's order (x + 0 = x, and a sum started from +0 is never
-0). tests/test_row_gradients.py compares the two paths bit for bit.

CPU and one process only: DistributedDataParallel expects dense gradients in its buckets
(and rows another process reached would land outside the tracked ones), and on a GPU
index_add_ accumulates in no fixed order while the caching allocator makes the dense
gradient cheap anyway."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def row_sums(ids: torch.Tensor, grad: torch.Tensor,
             padding_idx: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding lookup's weight gradient as its reached rows (sorted, (n,)) and their
    sums (n, H), from the ids (any shape) and the output's gradient (ids' shape, H)."""
    ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])  # (N,), (N, H)
    if padding_idx is not None:  # the padding row gets no gradient
        keep = ids != padding_idx
        ids, grad = ids[keep], grad[keep]
    rows, inverse = torch.unique(ids, return_inverse=True)  # sorted: coalesced indices
    # index_add_ adds in position order, row by row, as torch's dense backward does
    return rows, grad.new_zeros(len(rows), grad.shape[1]).index_add_(0, inverse, grad)


class _RowLookup(torch.autograd.Function):
    """F.embedding whose weight gradient is the reached rows, sparse: (V, H) with n rows."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None,
                owner: "RowGradEmbedding") -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.owner, ctx.shape = padding_idx, owner, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        ids, = ctx.saved_tensors
        rows, values = row_sums(ids, grad, ctx.padding_idx)
        ctx.owner.reached.append(rows)
        sparse = torch.sparse_coo_tensor(rows[None], values, ctx.shape, is_coalesced=True,
                                         check_invariants=False)
        return sparse, None, None, None


class RowGradEmbedding(nn.Embedding):
    """nn.Embedding (same parameter, same state-dict key) whose weight gradient is written
    into one persistent dense buffer. `reached`: index tensors of every row the buffer
    may hold nonzero (a superset; cleared when a fresh gradient replaces it)."""

    @classmethod
    def wrapping(cls, embedding: nn.Embedding) -> "RowGradEmbedding":
        # _weight: no random init (on "meta" its normal_ imports torch._dynamo, ~1.5 s)
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                     _weight=embedding.weight.detach())
        module.weight = embedding.weight  # the same Parameter: optimizers and buffers see it
        module.grad_buffer = torch.zeros_like(embedding.weight)
        module.reached = []
        embedding.weight.register_post_accumulate_grad_hook(module._densify)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.embedding(ids, self.weight, self.padding_idx)
        return _RowLookup.apply(self.weight, ids, self.padding_idx, self)

    def _densify(self, weight: torch.Tensor) -> None:
        """After autograd stored a backward pass's gradient: a sparse one (the first pass
        since .grad was cleared) becomes the buffer; a dense one is the buffer already
        (a later micro-batch, added to it in place) or one someone else set."""
        grad = weight.grad
        if not grad.is_sparse:
            if len(self.reached) > 1:
                self.reached = [torch.cat(self.reached).unique()]
            return
        rows, values = grad._indices()[0], grad._values()
        self.grad_buffer.index_fill_(0, torch.cat([rows, *self.reached]), 0)
        # autograd merges the lookups' coalesced gradients row by row (P1 + P2, as it adds
        # dense ones), so each row comes once here and 0 + P is P
        self.grad_buffer.index_add_(0, rows, values)
        self.reached = [rows]
        weight.grad = self.grad_buffer


def use_row_gradients(encoder: nn.Module, device: torch.device, distributed: bool) -> bool:
    """Swap the encoder's word embedding for a RowGradEmbedding where that is exact and
    pays: a trainable embedding, on the CPU, one process. Returns whether it did."""
    embedding = encoder.word_embedding
    if (device.type != "cpu" or distributed or not embedding.weight.requires_grad
            or isinstance(embedding, RowGradEmbedding)):
        return False
    encoder.word_embedding = RowGradEmbedding.wrapping(embedding)
    return True
