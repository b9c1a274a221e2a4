"""The data side of --sampling temperature / annealed (task_mixing.py decides the counts):
each task's examples in a stream of its own, pass after pass, from which every step takes
that step's count (a step may span two passes: no example is skipped and none repeats
within a pass; the stream runs on across epochs). Every process draws the same global
indices and takes its contiguous part of them (sharding.shard_range), cut into up to
--grad_accumulation micro-batches, as with the hand-set batches (sharding.py).

Length bucketing (--bucket): each pass shuffles, sorts chunks of 50 hand-set global
batches by length (each chunk ascending or descending at random) and shuffles the chunks,
so a step's consecutive examples of a task have similar lengths. Unlike the hand-set
batches, the batches themselves cannot be shuffled (their sizes are drawn at each step):
within a chunk the lengths drift over about 50 steps.
"""
from __future__ import annotations

import random
from typing import Sequence

from datasets import Batch, Collator, Example, pass_seed
from engine.sharding import micro_batches, shard_range
from engine.task_mixing import TaskMixer, check_step_size, parse_temperature

CHUNK_BATCHES = 50  # as datasets.BucketBatchSampler's


class ZeroWeightBatch(Batch):
    """A batch that counts as no examples: sharding.micro_scale gives its loss the factor
    0. A process whose part of a task's count is empty (a count below the number of
    processes) computes that task on one example of the step this way, so every process
    runs every task (DDP and the gradients' all-reduce expect the same parameters used
    everywhere) and the update is still the mean over the global batch."""

    def __len__(self) -> int:
        return 0

    @classmethod
    def of(cls, batch: Batch) -> "ZeroWeightBatch":
        return cls(batch.ids, batch.encoded, batch.labels)

    def pin_memory(self) -> "ZeroWeightBatch":
        return ZeroWeightBatch.of(Batch.pin_memory(self))

    def to(self, device) -> "ZeroWeightBatch":
        return ZeroWeightBatch.of(Batch.to(self, device))


class SampledStream:
    """Task `index`'s steps under a TaskMixer: the interface of datasets.TrainStream for
    the mix loop (next_step, new_pass, state_dict), with the count of each step from
    `mixer.counts`. Its position (pass, examples taken in it) is all it saves."""

    def __init__(self, index: int, mixer: TaskMixer, examples: Sequence[Example],
                 collate: Collator, bucket: bool, seed: int, chunk: int, micro: int = 1,
                 rank: int = 0, world_size: int = 1, pin: bool = False):
        self.index, self.mixer, self.examples, self.collate = index, mixer, list(examples), collate
        self.seed, self.chunk, self.micro, self.pin = seed, chunk, micro, pin
        self.rank, self.world_size = rank, world_size
        self.lengths = collate.lengths(self.examples) if bucket else None
        self.passes, self.taken = 0, 0
        self._order: list[int] | None = None

    def order(self, number: int) -> list[int]:
        """The example order of pass `number`: a function of (seed, pass), as the hand-set
        streams' orders are."""
        rng = random.Random(pass_seed(self.seed, number))
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        if self.lengths is None:
            return order
        chunks = [sorted(order[i:i + self.chunk], key=self.lengths.__getitem__,
                         reverse=rng.random() < 0.5) for i in range(0, len(order), self.chunk)]
        rng.shuffle(chunks)
        return [i for chunk in chunks for i in chunk]

    def take(self, count: int) -> list[int]:
        """The next `count` global indices, into the next pass when this one ends."""
        found: list[int] = []
        while len(found) < count:
            if self._order is None:
                self._order = self.order(self.passes)
            if self.taken == len(self._order):
                self.passes, self.taken, self._order = self.passes + 1, 0, None
                continue
            more = self._order[self.taken:self.taken + count - len(found)]
            found += more
            self.taken += len(more)
        return found

    def new_pass(self) -> None:
        """At an epoch's start: nothing. The stream runs on, so that a task's pass is never
        cut (an epoch is not a whole number of any task's passes)."""

    def next_step(self) -> tuple[list[Batch], int]:
        """This process's micro-batches of the step the mixer planned, and the task's
        global count."""
        count = self.mixer.counts[self.index]
        indices = self.take(count)
        part = shard_range(count, self.rank, self.world_size)
        mine = indices[part.start:part.stop]
        if mine:
            batches = [self.collate([self.examples[i] for i in m]) for m in micro_batches(mine, self.micro)]
        else:
            batches = [ZeroWeightBatch.of(self.collate([self.examples[indices[0]]]))]
        return [b.pin_memory() for b in batches] if self.pin else batches, count

    def state_dict(self) -> dict:
        return {"pass": self.passes, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.taken, self._order = state["pass"], state["taken"], None


def build_sampled(cfg, tasks: list, dist) -> tuple[TaskMixer, dict[str, SampledStream]] | None:
    """The mixer and the tasks' streams of a --sampling temperature / annealed mix run
    (None otherwise). A step holds --sampling_batch_size examples per process and
    micro-batch (default: the sum of the tasks' batch sizes, so it costs about what a
    cycle step costs), so the global step is the same on N processes x b as on one x Nb."""
    sampling = getattr(cfg, "sampling", "cycle")
    if sampling == "cycle" or cfg.mode != "mix":
        return None
    scale = cfg.grad_accumulation * dist.world_size
    per_process = cfg.sampling_batch_size or sum(t.batch_size for t in tasks)
    check_step_size(per_process, scale, len(tasks))
    mixer = TaskMixer([len(t.train) for t in tasks], per_process * scale, sampling,
                      parse_temperature(cfg.sampling_temperature), cfg.epochs, cfg.seed)
    streams = {t.name: SampledStream(k, mixer, t.train, t.collate, cfg.bucket, cfg.seed,
                                     CHUNK_BATCHES * t.batch_size * scale, cfg.grad_accumulation,
                                     dist.rank, dist.world_size, pin=dist.device.type == "cuda")
               for k, t in enumerate(tasks)}
    return mixer, streams
