"""Data-parallel pieces on PyTorch's own engine (torch.distributed, started by torchrun):
gloo on the CPU, nccl on CUDA. Without torchrun (WORLD_SIZE unset or 1) everything here is
a no-op on one process, so the single-process path stays as it was.

Which examples each process trains on, and the scaling of its losses that makes the update
exactly the single-process update on the global batch: sharding.py.

Evaluation: every rank predicts a contiguous shard (shard_range) of the ordered split and
gather_predictions concatenates the shards in rank order: the dev set is covered exactly
once, in file order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as torch_dist

from engine.errors import ReportedElsewhere, UserError


# --- process group -------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(use_gpu: bool) -> Dist:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): one
    process group, nccl with one GPU per process (cuda:LOCAL_RANK) or gloo on the CPU.
    Without WORLD_SIZE > 1: one process, no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = use_gpu and torch.cuda.is_available()
    if world_size <= 1:
        return Dist(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        kwargs = {"device_id": device} if cuda else {}
        torch_dist.init_process_group("nccl" if cuda else "gloo", rank=rank,
                                      world_size=world_size, **kwargs)
    return Dist(rank, world_size, local_rank, device)


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() \
        and torch_dist.get_world_size() > 1


def barrier() -> None:
    if active():
        torch_dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` on every rank (picklable objects)."""
    if not active():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(dist: Dist, fn: Callable[..., Any], *args) -> None:
    """fn(*args) on rank 0 only (a write into the run folder); a UserError it raises stops
    every rank at once (rank 0 names it, the others exit quietly), so that no rank waits at
    a barrier for a process that has gone."""
    error = None
    if dist.is_main:
        try:
            fn(*args)
        except UserError as err:
            error = err
    message = broadcast_object(None if error is None else str(error))  # also a barrier
    if error is not None:
        raise error
    if message is not None:
        raise ReportedElsewhere(message)


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# --- gradient averaging --------------------------------------------------------------------

def all_reduce_mean_(tensor: torch.Tensor, count: float | torch.Tensor | None = None) -> torch.Tensor:
    """In place: the mean of `tensor` over ranks; with `count` (this rank's number of
    examples, a number or one per row of `tensor`) the count-weighted mean
    sum_r c_r t_r / sum_r c_r, a row whose total count is 0 becoming 0. No-op on one process."""
    if not active():
        return tensor
    if count is None:
        torch_dist.all_reduce(tensor)
        return tensor.div_(torch_dist.get_world_size())
    counts = torch.as_tensor(count, dtype=tensor.dtype, device=tensor.device).clone()
    if counts.dim():  # one count per row
        counts = counts.view((-1,) + (1,) * (tensor.dim() - 1))
    tensor.mul_(counts)
    torch_dist.all_reduce(tensor)
    torch_dist.all_reduce(counts)
    return tensor.div_(counts.clamp(min=1e-30)).mul_(counts > 0)


def _collective_device() -> torch.device:
    """nccl reduces CUDA tensors only."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def grads_with_values(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.grad is not None]


def all_reduce_grads_(params: Iterable[torch.nn.Parameter], count: float | None = None) -> None:
    """The .grad of `params` averaged over ranks (count-weighted with `count`) in ONE
    collective over a flat buffer. Parameters without a gradient are skipped: which ones
    have none must be the same on every rank (it is: every rank runs the same tasks)."""
    if not active():
        return
    params = grads_with_values(params)
    if not params:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean_(flat, count)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_parameters_(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s parameters and buffers on every rank, so that all start identical."""
    if not active():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        torch_dist.broadcast(tensor.data, src)


def gather_objects(value) -> list:
    """Every process's `value`, in rank order ([value] on one process)."""
    if not active():
        return [value]
    found: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(found, value)
    return found


# --- evaluation ----------------------------------------------------------------------------

def gather_predictions(ids: Sequence, values: Sequence, labels: Sequence
                       ) -> tuple[list, list, list]:
    """Each rank's predictions on its shard_range of an ordered split -> the whole split's
    lists in the original order, on every rank (all_gather_object, then concatenation in
    rank order). Identity on one process."""
    if not active():
        return list(ids), list(values), list(labels)
    parts: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, (list(ids), list(values), list(labels)))
    return tuple([x for part in parts for x in part[i]] for i in range(3))
