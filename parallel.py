"""How a training step runs beyond one process in fp32: data parallelism under torchrun
(DistributedDataParallel for the plain sum; one all-reduce of the per-task gradient buffer
for the aggregators) and fp16 loss scaling. One StepContext per run; the single-process
fp32 context does nothing at all, so that path stays exactly as it was.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distributed
from distributed import Dist


class TaskLosses(nn.Module):
    """The mean losses of a step's tasks from ONE forward call: DistributedDataParallel
    expects one forward per backward."""

    def __init__(self, model: nn.Module, tasks: list):
        super().__init__()
        self.model = model
        self.tasks = tasks  # a plain list: the heads are registered in `model`

    def forward(self, names: list[str], batches: list) -> list[torch.Tensor]:
        tasks = {t.name: t for t in self.tasks}
        return [tasks[n].loss(self.model(n, b), b.labels) for n, b in zip(names, batches)]


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

    def sync(self, last: bool):
        """DDP averages gradients on the last micro-batch's backward only."""
        return nullcontext() if last or not self.dist.enabled else self.losses.no_sync()

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
        packed = torch.tensor(values + [0.0], dtype=torch.float64, device=device)
        torch_dist.all_reduce(packed[:-1])
        flag = torch.tensor([float(stop)], dtype=torch.float64, device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return (packed[:-1] / self.dist.world_size).tolist(), int(flag.item())

    def reduce_grads(self, params) -> None:
        """Gradients the aggregator leaves alone (the heads'): averaged in one collective."""
        distributed.all_reduce_grads_(params)


def make_context(model: nn.Module, tasks: list, dist: Dist, fp16: bool, find_unused: bool,
                 ddp: bool = True) -> StepContext:
    """`find_unused`: some parameters get no gradient in a step (seq mode: one task's head).
    `ddp=False`: gradients are averaged by the caller (the aggregators' path): no DDP, whose
    hooks would sync every per-task backward pass."""
    local = TaskLosses(model, tasks)
    losses: nn.Module = local
    if dist.enabled and not ddp:
        distributed.broadcast_parameters_(model)  # every rank starts from rank 0's weights
    elif dist.enabled:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters at construction: every rank starts the same.
        losses = DistributedDataParallel(local, device_ids=device_ids,
                                         find_unused_parameters=find_unused)
    scaler = torch.amp.GradScaler(dist.device.type) if fp16 else None
    return StepContext(dist, losses, local, scaler)


def gather_objects(value) -> list:
    """Every process's `value`, in rank order ([value] on one process)."""
    if not distributed.active():
        return [value]
    found: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(found, value)
    return found
