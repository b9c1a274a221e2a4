"""Which examples of a step each process takes, and how a step's batch splits into
micro-batches: the data side of data parallelism and gradient accumulation.

Every process builds the SAME global batch order (same seed, same pass counter). A global
batch holds batch_size x grad_accumulation x world_size examples; process r takes the r-th
of world_size contiguous parts of it (shard_range) and cuts its part into up to
grad_accumulation contiguous micro-batches. So `--batch_size b` on 2 processes, or with
`--grad_accumulation 2`, sees exactly the examples of `--batch_size 2b` on one process,
and a step is the same update when each micro-batch's mean loss is scaled by
micro_scale (see there). A global batch with fewer examples than processes cannot give
every process an example and is dropped by all of them (at most world_size - 1 examples a
pass), so every process takes the same number of steps.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence


def split_sizes(n: int, parts: int) -> list[int]:
    """n split into `parts` contiguous parts differing by at most one (first ones larger)."""
    return [n // parts + (r < n % parts) for r in range(parts)]


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous part of range(n); the parts cover it once, in order."""
    sizes = split_sizes(n, world_size)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def micro_batches(indices: Sequence[int], count: int) -> list[list[int]]:
    """`indices` cut into up to `count` contiguous non-empty micro-batches."""
    sizes = [s for s in split_sizes(len(indices), count) if s]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [list(indices[a:a + s]) for a, s in zip(starts, sizes)]


def micro_scale(size: int, global_size: int, world_size: int) -> float:
    """The factor of a micro-batch's MEAN loss: size x world_size / global_size. Summed over
    a process's micro-batches and then averaged over processes (DDP's mean), the gradients
    are exactly the gradient of the mean loss over the global batch, also when the parts
    are unequal (1.0 on one process without accumulation)."""
    return size * world_size / global_size


class WithinBatchShards:
    """Rank r's contiguous part of every global batch of `batch_sampler` (a batch sampler of
    datasets.py: it has `batch_size` and `num_examples`). Iterating it iterates the wrapped
    sampler once, so the wrapped pass counter advances as on one process."""

    def __init__(self, batch_sampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __iter__(self) -> Iterator[tuple[list[int], int]]:
        """(this rank's part, the global batch's size) for every kept global batch."""
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) < self.world_size:
                continue  # not every rank would get an example: dropped on every rank
            part = shard_range(len(batch), self.rank, self.world_size)
            yield batch[part.start:part.stop], len(batch)

    def __len__(self) -> int:
        # full batches and one remainder (the bucketed sampler's chunks are whole multiples
        # of the batch size, so it too has one short batch, somewhere in the order)
        sampler = self.batch_sampler
        examples = getattr(sampler, "num_examples", None)
        if examples is None:  # a torch BatchSampler without drop_last
            examples = len(sampler.sampler)
        full, rest = divmod(examples, sampler.batch_size)
        return full + (rest >= self.world_size)


class Parts(WithinBatchShards):
    """Rank r's parts alone (without the global batch sizes)."""

    def __iter__(self) -> Iterator[list[int]]:
        return (part for part, _ in super().__iter__())


def shard_within_batches(batch_sampler: Iterable[list[int]], rank: int, world_size: int) -> Parts:
    return Parts(batch_sampler, rank, world_size)
