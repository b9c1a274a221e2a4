"""Each task's gradient of the shared encoder from ONE packed forward and ONE backward of
the summed loss: a combiner's step (an aggregator, a balancing, the diagnostics) of a
packed run, at about the cost of a plain step.

Why it is exact. In the packed pass (bert.BertModel.forward_many) no token meets another
sequence's tokens (attention is per sequence), and task k's loss reads task k's sequences
only. So at every layer the gradient rows of task k's tokens are d loss_k / d output, with
nothing from the other tasks, and each shared parameter's gradient is a sum of per-token
(the pooler: per-sequence) terms: task k's gradient is that sum over task k's rows, one
contiguous block of the packing (bert.Packing.token_spans, .spans):
  Linear      dW_k = dY[rows_k]^T X[rows_k]          db_k = dY[rows_k].sum(0)
  LayerNorm   dgamma_k = (dY * x_hat)[rows_k].sum(0)  dbeta_k = dY[rows_k].sum(0)
  Embedding   task k's rows of dE summed per id (word, position, token type)
as per-sample gradients (Opacus) are, per task instead of per sample.

How. Forward hooks keep each module's input and hook its output's gradient; each
embedding's output becomes a leaf, and the backward runs with `inputs` = those leaves and
the heads' parameters: autograd computes the input gradients once and the heads'
gradients as usual, never the encoder's summed weight gradients (a third of a backward).
The weight-gradient products are the same FLOPs split into K row blocks, written straight
into the combiner's buffer rows (pcgrad.PCGrad) where a per-task backward would put them,
so the Gram matrix, the aggregators, the all-reduce and fp16's unscaling are unchanged.
Equal to one backward per task up to float reassociation (tests/test_task_grads.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from bert import BertModel, Packing
from engine.compiling import is_compiled
from engine.row_gradients import row_sums
from pcgrad import PCGrad

TOKEN_WISE = (nn.Linear, nn.LayerNorm, nn.Embedding)


def owned_parameters(encoder: nn.Module, buffer: PCGrad) -> dict | None:
    """Each token-wise module of the encoder -> {its parameter's name: that parameter's
    index in the buffer}. None where this path cannot give every buffer parameter's
    gradient: one outside these modules, or a trainable encoder parameter outside the
    buffer (an embedding's gradient would be lost below the leaves)."""
    index = {id(p): i for i, p in enumerate(buffer.params)}
    if any(p.requires_grad and id(p) not in index for p in encoder.parameters()):
        return None
    owned = {module: {name: index[id(p)] for name, p in module.named_parameters(recurse=False)
                      if id(p) in index}
             for module in encoder.modules() if isinstance(module, TOKEN_WISE)}
    covered = sorted(i for names in owned.values() for i in names.values())
    return owned if covered == list(range(len(buffer.params))) else None


class PackedTaskPass:
    """One micro-batch of a combiner's step: `tasks[j]`'s batch is the j-th of the packed
    pass; its gradients go to the buffer's row tasks[j], added to what the row holds where
    `accumulate[j]` (a later micro-batch). Use: `with recording():` the packed forward,
    then backward(summed loss)."""

    def __init__(self, buffer: PCGrad, owned: dict, tasks: list[int], accumulate: list[bool],
                 packing: Packing):
        if any(accumulate) and buffer.sparse:
            raise ValueError("accumulating micro-batches needs dense rows: no sparse_rows")
        self.buffer, self.owned = buffer, owned
        self.tasks, self.accumulate = tasks, accumulate
        self.tokens = packing.token_spans  # the rows of the (N, .) token-wise layers
        self.sequences = [(start, end) for start, end, _ in packing.spans]  # the pooler's (S, .)
        self.leaves: list[torch.Tensor] = []  # the embeddings' outputs
        self.written: set[int] = set()  # the buffer parameters given their rows
        self.called: set[nn.Module] = set()

    @classmethod
    def start(cls, losses: nn.Module, buffer: PCGrad, tasks: list[int], batches: list,
              accumulate: list[bool]) -> "PackedTaskPass | None":
        """For step.TaskLosses `losses`; None where it does not apply (not packed, not our
        BertModel, compiled, a parameter it does not cover): the caller takes one pass per
        task."""
        encoder = getattr(losses.model, "encoder", None)
        # a compiled pass: Dynamo traces the forward hooks and refuses their leaf outputs
        if not (losses.packed and isinstance(encoder, BertModel)) or is_compiled(losses):
            return None
        owned = owned_parameters(encoder, buffer)
        return None if owned is None else cls(buffer, owned, tasks, accumulate,
                                              Packing.of([b.encoded for b in batches]))

    @contextmanager
    def recording(self):
        """Hooks on the encoder's modules while the packed forward runs inside."""
        handles = [module.register_forward_hook(self._forward_hook) for module, names in
                   self.owned.items() if names or isinstance(module, nn.Embedding)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def backward(self, loss: torch.Tensor, unshared: list) -> None:
        """Backward the summed loss: the heads' (`unshared`) gradients into .grad, each
        task's encoder gradients into its buffer row. A parameter no task's loss reached
        (an unread pooler) gets zero rows, as PCGrad.backward gives it."""
        inputs = [p for p in unshared if p.requires_grad] + self.leaves
        torch.autograd.backward(loss, inputs=inputs)
        for index in range(len(self.buffer.params)):
            if index not in self.written:
                for k, accumulate in zip(self.tasks, self.accumulate):
                    self.buffer.store_grad(k, index, None, accumulate)

    def _forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if module in self.called:  # its second output's rows would overwrite the first's
            raise RuntimeError(f"{type(module).__name__} called twice in one packed pass")
        self.called.add(module)
        names = self.owned[module]
        if isinstance(module, nn.Embedding):
            # a leaf: the backward stops here, below it nothing is left to compute
            output = output.detach().requires_grad_()
            self.leaves.append(output)
            if names:
                output.register_hook(partial(self._embedding, module, args[0], names))
            return output
        if output.requires_grad:
            grads = self._linear if isinstance(module, nn.Linear) else self._layer_norm
            output.register_hook(partial(grads, module, args[0], names))
        return None

    def _segments(self, rows: int):
        """(first, end) rows, buffer row and accumulate flag of each task."""
        if rows == self.tokens[-1][1]:
            spans = self.tokens
        elif rows == self.sequences[-1][1]:
            spans = self.sequences
        else:  # not a layout of this packing: better stop than write wrong gradients
            raise RuntimeError(f"{rows} rows are neither the packing's tokens nor its sequences")
        return zip(spans, self.tasks, self.accumulate)

    def _linear(self, module: nn.Linear, x: torch.Tensor, names: dict, grad: torch.Tensor) -> None:
        # under autocast the products are in the output's dtype, as autograd's would be
        x = x.reshape(-1, x.shape[-1]).to(grad.dtype)
        grad = grad.reshape(-1, grad.shape[-1])
        for (first, end), k, accumulate in self._segments(len(grad)):
            if "weight" in names:
                self._product(k, names["weight"], accumulate, grad[first:end].T, x[first:end])
            if "bias" in names:
                self._put(k, names["bias"], accumulate, grad[first:end].sum(0))
        self.written.update(names.values())

    def _layer_norm(self, module: nn.LayerNorm, x: torch.Tensor, names: dict,
                    grad: torch.Tensor) -> None:
        normalized = F.layer_norm(x.to(grad.dtype), module.normalized_shape, eps=module.eps)
        normalized, grad = normalized.reshape(-1, grad.shape[-1]), grad.reshape(-1, grad.shape[-1])
        for (first, end), k, accumulate in self._segments(len(grad)):
            if "weight" in names:
                self._put(k, names["weight"], accumulate,
                          (grad[first:end] * normalized[first:end]).sum(0))
            if "bias" in names:
                self._put(k, names["bias"], accumulate, grad[first:end].sum(0))
        self.written.update(names.values())

    def _embedding(self, module: nn.Embedding, ids: torch.Tensor, names: dict,
                   grad: torch.Tensor) -> None:
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        index = names["weight"]
        sparse = self.buffer.sparse_part(index)
        for (first, end), k, accumulate in self._segments(len(ids)):
            rows, values = row_sums(ids[first:end], grad[first:end], module.padding_idx)
            if sparse is not None:  # the rows SparseRows.store would find: nonzero (or NaN)
                live = (values != 0).any(1)
                sparse.store_rows(k, rows[live], values[live])
                continue
            view = self.buffer.task_views[k][index]
            if not accumulate:
                view.zero_()
            view.index_add_(0, rows, values.to(view.dtype))
        self.written.add(index)

    def _product(self, k: int, index: int, accumulate: bool, left: torch.Tensor,
                 right: torch.Tensor) -> None:
        """left @ right into task k's view of parameter `index`, without a temporary where
        the dtypes allow."""
        view = self.buffer.task_views[k][index]
        if left.dtype != view.dtype:
            self._put(k, index, accumulate, left @ right)
        elif accumulate:
            view.addmm_(left, right)
        else:
            torch.mm(left, right, out=view)

    def _put(self, k: int, index: int, accumulate: bool, grad: torch.Tensor) -> None:
        view = self.buffer.task_views[k][index]
        if accumulate:
            view.add_(grad.to(view.dtype))
        else:
            view.copy_(grad)
