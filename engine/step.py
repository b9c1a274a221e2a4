"""One optimizer step (train_step): gradients accumulated over micro-batches, combined by
the plain sum or an aggregator, averaged over torchrun's processes (DistributedDataParallel
for the plain sum; one all-reduce of the per-task gradient buffer for the aggregators),
under fp16 loss scaling where asked. One StepContext per run holds how; on one process in
fp32 it does nothing at all, so that path stays exactly as it was.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine import distributed
from engine.distributed import Dist
from engine.combiner import Combiner, LossWeights
from engine.losses import doubled, fold
from engine.precision import Precision
from engine.sharding import micro_scale
from engine.task_grads import PackedTaskPass
from engine.tasks import Task
from engine.trainer_state import check_finite


class TaskLosses(nn.Module):
    """The mean losses of a step's tasks from ONE forward call: DistributedDataParallel
    expects one forward per backward."""

    def __init__(self, model: nn.Module, tasks: list, packed: bool = False):
        super().__init__()
        self.model = model
        self.tasks = {t.name: t for t in tasks}  # a plain dict: the heads are registered in `model`
        self.packed = packed  # one encoder pass for all the tasks (MultitaskBERT.forward_many)

    def forward(self, names: list[str], batches: list, per_task: bool = False) -> list[torch.Tensor]:
        """`per_task`: one encoder pass per task even when packed (a combiner's steps
        where engine/task_grads.py does not apply).
        R-Drop's tasks run twice: their batches again in the same pass (losses.doubled)."""
        run_names, run_batches = doubled(self.tasks, names, batches)
        outputs = (self.model.forward_many(run_names, run_batches) if self.packed and not per_task
                   else [self.model(n, b) for n, b in zip(run_names, run_batches)])
        return fold(self.tasks, names, outputs, batches)

    def runs_twice(self, names: list[str]) -> bool:
        """Whether R-Drop encodes some of these tasks' batches a second time."""
        return any(self.tasks[n].rdrop for n in names)


@dataclass
class StepContext:
    """`dist`: this process's place; `losses`: TaskLosses, wrapped in DDP when distributed
    (for the plain sum), `local` the unwrapped one (per-task backward passes, which must
    not sync); `scaler`: a GradScaler under fp16; `unshared`: the parameters outside the
    aggregator's buffer, whose gradients (the heads') are averaged over processes apart."""
    dist: Dist
    losses: nn.Module
    local: TaskLosses
    scaler: torch.amp.GradScaler | None = None
    unshared: list = field(default_factory=list)  # parameters outside the aggregator's buffer
    trainable: list = field(default_factory=list)  # all of them, for plain steps without DDP

    @property
    def ddp_syncs(self) -> bool:
        """Whether DDP averages the plain sum's gradients (else reduce_grads must, when
        several processes run)."""
        return isinstance(self.losses, DistributedDataParallel)

    def sync(self, last: bool):
        """DDP averages gradients on the last micro-batch's backward only."""
        return self.losses.no_sync() if self.ddp_syncs and not last else nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def agree(self, values: list[float], stop: int) -> tuple[list[float], int]:
        """The step's task losses averaged over processes (each process passes its share,
        see sharding.micro_scale) and the largest stop signal any process received: every
        process then takes the same decisions (log, diverge, save, stop) at the same step."""
        if not self.dist.enabled:
            return values, stop
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch_dist.get_backend() == "nccl" else torch.device("cpu")
        total = torch.tensor(values, dtype=torch.float64, device=device)
        torch_dist.all_reduce(total)
        flag = torch.tensor([float(stop)], dtype=torch.float64, device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return (total / self.dist.world_size).tolist(), int(flag.item())

    def reduce_grads(self, params) -> None:
        """Gradients the aggregator leaves alone (the heads'): averaged in one collective."""
        distributed.all_reduce_grads_(params)


def make_context(model: nn.Module, tasks: list, dist: Dist, precision: Precision,
                 find_unused: bool, combined: list = (), ddp: bool = True,
                 packed: bool = False) -> StepContext:
    """`find_unused`: some parameters get no gradient in a step (seq mode: one task's head).
    `combined`: the parameters of the combiner's buffer (the trainable encoder); the rest
    (the heads') are averaged over processes apart on the steps that use the buffer.
    The per-task passes of the aggregators go through `local`, not DDP's forward, so DDP's
    hooks stay idle in their backward passes (tests/test_ddp.py mixes both in one run).
    `ddp=False`: no DDP at all; plain steps are then averaged by reduce_grads.
    `packed`: one encoder pass per micro-batch for all its tasks (TaskLosses)."""
    local = TaskLosses(model, tasks, packed)
    losses: nn.Module = local
    if dist.enabled and not ddp:
        distributed.broadcast_parameters_(model)  # every rank starts from rank 0's weights
    elif dist.enabled:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters at construction: every rank starts the same.
        losses = DistributedDataParallel(local, device_ids=device_ids,
                                         find_unused_parameters=find_unused)
    in_buffer = {id(p) for p in combined}
    return StepContext(dist, losses, local, precision.make_scaler(),
                       unshared=[p for p in model.parameters() if id(p) not in in_buffer],
                       trainable=[p for p in model.parameters() if p.requires_grad])


def train_step(ctx: StepContext, tasks: list[Task], drawn: list, optimizer,
               combiner: Combiner | LossWeights | None = None,
               stop: int = 0) -> tuple[list[float], torch.Tensor | None, int]:
    """One optimizer step. drawn[k]: task k's micro-batches on this process and its global
    batch size. The gradients of the micro-batches accumulate (backward_all); then the
    plain sum (averaged over processes by DDP) or `combiner`'s combination; then the step
    (skipped by the fp16 loss scaler on an overflow). LossWeights: the plain step's one
    backward, of the losses weighted from their values (weighted_backward). Returns the
    global mean task losses, the Gram matrix and the stop signal all processes agreed on. A
    non-finite loss or gradient raises NonFinite before anything is updated."""
    optimizer.zero_grad(set_to_none=True)
    names = [t.name for t in tasks]
    if isinstance(combiner, LossWeights):
        values, stop = weighted_backward(ctx, tasks, drawn, combiner, stop)
        combiner = None
    else:
        values, stop = ctx.agree(backward_all(ctx, names, drawn, combiner), stop)
        check_finite(values, names, "loss")
    gram = None
    if combiner is None and not ctx.ddp_syncs:  # a plain step without DDP
        ctx.reduce_grads(ctx.trainable)
    if combiner is not None:
        gram = combiner.combine(values, ctx.loss_scale())  # the aggregator + diagnostics
        ctx.reduce_grads(ctx.unshared)
        if ctx.scaler is None:  # under fp16 an overflow skips the step instead
            check_finite(gram.diagonal().tolist(), names, "gradient")
    if ctx.scaler is not None:
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        optimizer.step()
    return values, gram, stop


def backward_all(ctx: StepContext, names: list[str], drawn: list,
                 combiner: Combiner | None) -> list[float]:
    """Forward and backward every micro-batch, each mean loss scaled by its share of the
    global batch (sharding.micro_scale): into .grad (plain sum) or each task's row of the
    buffer (`combiner`). Returns this process's share of each task's mean loss."""
    count, world = max(len(micro) for micro, _ in drawn), ctx.dist.world_size
    shares = [0.0] * len(names)
    for i in range(count):
        # right-aligned: the last micro-batch holds every task (DDP syncs on its backward)
        here = [k for k, (micro, _) in enumerate(drawn) if i >= count - len(micro)]
        batches = [drawn[k][0][i - count + len(drawn[k][0])].to(ctx.dist.device) for k in here]
        scales = [micro_scale(len(b), drawn[k][1], world) for k, b in zip(here, batches)]
        accumulate = [i > count - len(drawn[k][0]) for k in here]
        # A combiner needs each task's gradient apart: from one packed pass where
        # task_grads applies, else one pass per task (a packed pass's backward from one
        # task's loss would run over every task's tokens). R-Drop's second copies of a
        # batch would share its task's buffer row: those steps take the per-task passes.
        one_pass = (combiner and not ctx.local.runs_twice([names[k] for k in here])
                    and PackedTaskPass.start(ctx.local, combiner.buffer, here, batches, accumulate))
        with ctx.sync(last=i == count - 1):
            with one_pass.recording() if one_pass else nullcontext():
                found = (ctx.losses([names[k] for k in here], batches) if combiner is None
                         else ctx.local([names[k] for k in here], batches) if one_pass
                         else per_task_losses(ctx.local, [names[k] for k in here], batches))
            losses = [loss if scale == 1.0 else loss * scale for loss, scale in zip(found, scales)]
            for k, loss in zip(here, losses):
                shares[k] += loss.item()
            if combiner is None:
                ctx.scale(torch.stack(losses).sum()).backward()
            elif one_pass:
                one_pass.backward(ctx.scale(torch.stack(losses).sum()), ctx.unshared)
            else:
                for k, loss, more in zip(here, losses, accumulate):
                    combiner.backward(k, ctx.scale(loss), accumulate=more)
    return shares


def weighted_backward(ctx: StepContext, tasks: list[Task], drawn: list, weighing: LossWeights,
                      stop: int) -> tuple[list[float], int]:
    """One micro-batch's forward, its losses agreed over processes and weighed, then ONE
    backward of sum_k w_k L_k into .grad (DDP averages it as a plain step's). The rows' path
    weighs the shared encoder only, each head keeping its own task's gradient: so each
    head's gradient is divided by its weight again (a weight under the dtype's smallest
    normal number is taken as that number, so that the division is defined)."""
    names = [t.name for t in tasks]
    if any(len(micro) > 1 for micro, _ in drawn):
        raise RuntimeError("loss-only weights need one micro-batch a step (Combiner.loss_only)")
    batches = [micro[0].to(ctx.dist.device) if micro else None for micro, _ in drawn]
    here = [k for k, batch in enumerate(batches) if batch is not None]
    scales = [micro_scale(len(batches[k]), drawn[k][1], ctx.dist.world_size) for k in here]
    with ctx.sync(last=True):
        found = ctx.losses([names[k] for k in here], [batches[k] for k in here])
        losses = [loss if scale == 1.0 else loss * scale for loss, scale in zip(found, scales)]
        shares = [0.0] * len(names)
        for k, loss in zip(here, losses):
            shares[k] = loss.item()
        values, stop = ctx.agree(shares, stop)
        check_finite(values, names, "loss")
        dtype = losses[0].dtype
        weights = weighing.weigh(values).to(dtype).clamp(min=torch.finfo(dtype).tiny)
        weighted = torch.stack(losses) * weights[here].to(losses[0].device)  # (tasks here,)
        ctx.scale(weighted.sum()).backward()
    for k in here:
        for param in tasks[k].head.parameters():
            if param.grad is not None:
                param.grad.div_(weights[k].item())
    return values, stop


def per_task_losses(losses: TaskLosses, names: list[str], batches: list) -> list[torch.Tensor]:
    """One call per task, so that each task's loss has a graph of its own for its backward:
    a compiled TaskLosses (AOTAutograd) gives all of one call's losses ONE backward node,
    which a first backward frees. The same dropout draws, in the same order, as one call."""
    return [losses([name], [batch], per_task=True)[0] for name, batch in zip(names, batches)]
