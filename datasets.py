"""Readers for the starter's tab-separated data files, and the batching that feeds the
encoder: dynamic padding through the project tokenizer, optional length bucketing."""
from __future__ import annotations

import csv
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.errors import DataError
from engine.runfiles import read_lines
from engine.sharding import WithinBatchShards, micro_batches
from engine.specs import LabelSpec
from tokenizer import BertTokenizer, Encoded

MAX_REPORTED_LINES = 5
LOG = logging.getLogger("minbert.data")


@dataclass
class Example:
    id: str
    texts: tuple[str, ...]  # one sentence, or a pair
    label: float | int | None = None


def read_examples(path: str, text_columns: Sequence[str],
                  label: LabelSpec | None = None) -> list[Example]:
    """Read a starter file (engine/runfiles.read_lines: UTF-8, lines at \\n or \\r\\n).
    Rows with an empty field are skipped with one warning that names their lines; a missing
    file or column, a folder, a label out of range or bytes that are not UTF-8 raise
    DataError naming the file and line."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (see data/README.md to fetch the data)")
    examples, skipped = _read_rows(path, text_columns, label)
    if skipped:
        LOG.warning(f"{path}: skipped {len(skipped)} row(s) with an empty field "
                    f"(line {_some(skipped)})")
    if not examples:
        raise DataError(f"{path}: no usable rows")
    repeated = [i for i, n in Counter(e.id for e in examples).items() if n > 1]
    if repeated:
        LOG.warning(f"{path}: {len(repeated)} id(s) occur more than once ({_some(repeated)}); "
                    "their prediction files will repeat them")
    return examples


def _some(items: list) -> str:
    more = ", ..." if len(items) > MAX_REPORTED_LINES else ""
    return ", ".join(map(str, items[:MAX_REPORTED_LINES])) + more


def _read_rows(path: str, text_columns: Sequence[str],
               label: LabelSpec | None) -> tuple[list[Example], list[int]]:
    columns = ["id", *text_columns] + ([label.column] if label else [])
    lines = read_lines(path)
    header = (split_fields(lines[0]) or lines[0].split("\t")) if lines else []
    absent = [c for c in columns if c not in header]
    if absent:
        raise DataError(f"{path}: missing column(s) {', '.join(absent)} "
                        f"(header has {', '.join(header) or 'nothing'})")
    examples, skipped, unquoted = [], [], []
    for number, line in enumerate(lines[1:], 2):
        if not line:
            continue
        fields = split_fields(line)
        if fields is None:
            unquoted.append(number)
            fields = line.split("\t")
        row = dict(zip(header, fields))
        values = [row.get(c) for c in columns]
        if any(v is None or not v.strip() for v in values):
            skipped.append(number)
            continue
        examples.append(Example(row["id"].strip(), tuple(row[c].strip() for c in text_columns),
                                parse_label(label, row, path, number)))
    if unquoted:
        LOG.warning(f"{path}: {len(unquoted)} line(s) whose quotes do not parse read as "
                    f"plain text (line {_some(unquoted)})")
    return examples, skipped


def split_fields(line: str) -> list[str] | None:
    """A line's TAB-separated fields. The starter's files quote a field that holds a `"`
    as CSV does (`"a ""b"" c"`): such a field is unquoted, within its own line only, so a
    stray `"` never swallows the lines after it. None: the line's quotes do not parse."""
    if '"' not in line:
        return line.split("\t")
    try:
        return next(csv.reader([line], delimiter="\t", strict=True), [])
    except csv.Error:
        return None


def parse_label(spec: LabelSpec | None, row: dict, path: str, line: int) -> float | int | None:
    if spec is None:
        return None
    try:
        return spec.parse(row[spec.column])
    except ValueError as err:
        raise DataError(f"{path}, line {line}: bad {spec.column} label: {err}") from None


def read_sentences(path: str, label: LabelSpec | None = None) -> list[Example]:
    return read_examples(path, ["sentence"], label)


def read_pairs(path: str, label: LabelSpec | None = None) -> list[Example]:
    return read_examples(path, ["sentence1", "sentence2"], label)


# --- batching ------------------------------------------------------------------------------

class ExampleDataset(Dataset):
    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass
class Batch:
    ids: list[str]
    encoded: Encoded  # (B, T); for a bi-encoder pair batch (2B, T): first sentences, then seconds
    labels: torch.Tensor | None  # (B,) int64 class ids or float32 scores

    def pin_memory(self) -> "Batch":
        labels = None if self.labels is None else self.labels.pin_memory()
        return Batch(self.ids, self.encoded.pin_memory(), labels)

    def to(self, device: torch.device | str) -> "Batch":
        labels = None if self.labels is None else self.labels.to(device, non_blocking=True)
        return Batch(self.ids, self.encoded.to(device), labels)

    def __len__(self) -> int:
        return len(self.ids)


class Collator:
    """Examples -> Batch. A pair is one `[CLS] a [SEP] b [SEP]` input (cross-encoder) or,
    with `separate=True`, its two sentences are stacked as 2B single inputs (bi-encoder),
    so that one encoder pass serves both sides; with `both=True` (a cross and a bi head on
    the same pair) the B cross inputs come first, then the 2B single ones, all padded to
    the longest."""

    def __init__(self, tokenizer: BertTokenizer, separate: bool = False, both: bool = False):
        self.tokenizer = tokenizer
        self.separate = separate
        self.both = both

    def __call__(self, examples: Sequence[Example]) -> Batch:
        columns = [list(col) for col in zip(*(e.texts for e in examples))]
        if len(columns) == 2 and self.both:
            encoded = stack_encoded([self.tokenizer.encode(columns[0], columns[1]),
                                     self.tokenizer.encode(columns[0] + columns[1])],
                                    self.tokenizer.pad_token_id)
        elif len(columns) == 2 and not self.separate:
            encoded = self.tokenizer.encode(columns[0], columns[1])
        else:
            encoded = self.tokenizer.encode([text for col in columns for text in col])
        labels = None
        if examples[0].label is not None:
            dtype = torch.long if isinstance(examples[0].label, int) else torch.float32
            labels = torch.tensor([e.label for e in examples], dtype=dtype)
        return Batch([e.id for e in examples], encoded, labels)

    def lengths(self, examples: Sequence[Example]) -> list[int]:
        columns = [list(col) for col in zip(*(e.texts for e in examples))]
        if len(columns) == 2 and not self.separate and not self.both:
            return self.tokenizer.lengths(columns[0], columns[1])
        per_column = [self.tokenizer.lengths(col) for col in columns]
        if len(columns) == 2 and self.both:
            per_column.append(self.tokenizer.lengths(columns[0], columns[1]))
        return [max(ls) for ls in zip(*per_column)]

    def inputs_per_example(self, examples: Sequence[Example]) -> int:
        """Encoder inputs (rows of a batch) each example becomes: two for a bi-encoder
        pair, three for a pair encoded both ways, each padded to the longest of the batch."""
        columns = len(examples[0].texts)
        if columns == 2 and self.both:
            return 3
        return 1 if columns == 2 and not self.separate else columns


def stack_encoded(parts: Sequence[Encoded], pad_id: int) -> Encoded:
    """Several encoded batches as one, each padded to the longest: input_ids with the
    [PAD] id, token types and attention mask with 0, as the tokenizer pads."""
    length = max(p.input_ids.shape[1] for p in parts)

    def cat(name: str, value: int) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(getattr(p, name),
                                                  (0, length - p.input_ids.shape[1]), value=value)
                          for p in parts])
    return Encoded(cat("input_ids", pad_id), cat("token_type_ids", 0), cat("attention_mask", 0))


def pass_seed(seed: int, epoch: int) -> str:
    """The shuffle seed of one pass. Not seed + epoch: then seed s + 1 would replay seed
    s's orders one pass later, and runs of neighbouring seeds would share their data order."""
    return f"{seed}/{epoch}"


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches: shuffle, sort by length within chunks of `chunk_batches`
    batches, cut into batches, shuffle the batches. Batches hold similar lengths, so
    little compute goes to padding; the order still changes every epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 chunk_batches: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.chunk = batch_size * chunk_batches
        self.seed = seed
        self.epoch = 0

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(pass_seed(self.seed, self.epoch))
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start:start + self.chunk], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


def make_loader(examples: Sequence[Example], collate: Collator, batch_size: int,
                shuffle: bool, bucket: bool = False, seed: int = 0,
                batches: Sequence[Sequence[int]] | None = None) -> DataLoader:
    """Training loaders shuffle (optionally bucketed by length); evaluation loaders keep
    the file order, or take the given `batches` of indices."""
    dataset = ExampleDataset(examples)
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    if shuffle and bucket:
        sampler = BucketBatchSampler(collate.lengths(examples), batch_size, seed)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=generator)


class ShuffledBatches:
    """Plain shuffled batches, a fresh order each pass from (seed, pass): like the bucketed
    sampler, its order is a function of the pass number, so a resumed run can rebuild it."""

    def __init__(self, size: int, batch_size: int, seed: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch = 0

    @property
    def num_examples(self) -> int:
        return self.size

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.size))
        random.Random(pass_seed(self.seed, self.epoch)).shuffle(order)
        self.epoch += 1
        return iter([order[i:i + self.batch_size] for i in range(0, self.size, self.batch_size)])


class TrainStream:
    """One task's training steps, pass after pass, with a position a checkpoint can save:
    the sampler's pass number and the global batches taken in that pass. Each step is one
    global batch of batch_size x micro x world_size examples; this process gets its part as
    up to `micro` micro-batches (sharding.py). Skipping on resume draws indices only;
    nothing is tokenized twice."""

    def __init__(self, examples: Sequence[Example], collate: Collator, batch_size: int,
                 bucket: bool = True, seed: int = 0, micro: int = 1, rank: int = 0,
                 world_size: int = 1, pin: bool = False):
        self.examples, self.collate, self.micro, self.pin = list(examples), collate, micro, pin
        size = batch_size * micro * world_size
        self.sampler = (BucketBatchSampler(collate.lengths(self.examples), size, seed)
                        if bucket else ShuffledBatches(len(self.examples), size, seed))
        self.shards = WithinBatchShards(self.sampler, rank, world_size)
        self.taken = 0
        self._batches: Iterator[tuple[list[int], int]] | None = None

    def __len__(self) -> int:
        return len(self.shards)

    def new_pass(self) -> None:
        # torch's DataLoader, which fed training before, drew a base seed from the global
        # generator at every pass; drawing it still keeps earlier runs' numbers repeatable.
        torch.empty((), dtype=torch.int64).random_()
        self._batches, self.taken = iter(self.shards), 0

    def next_indices(self) -> tuple[list[int], int]:
        """This process's part of the next global batch, and the global batch's size; a new
        pass starts when the current one is exhausted."""
        if self._batches is None:
            self.new_pass()
        found = next(self._batches, None)
        if found is None:
            self.new_pass()
            found = next(self._batches)
        self.taken += 1
        return found

    def next_step(self) -> tuple[list[Batch], int]:
        """The next step's micro-batches (pinned for a fast copy to a GPU when `pin`) and
        the global batch size."""
        part, global_size = self.next_indices()
        batches = [self.collate([self.examples[i] for i in indices])
                   for indices in micro_batches(part, self.micro)]
        return [b.pin_memory() for b in batches] if self.pin else batches, global_size

    def state_dict(self) -> dict:
        started = self._batches is not None
        return {"pass": self.sampler.epoch - started, "taken": self.taken, "started": started}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch, self._batches, self.taken = state["pass"], None, 0
        if state["started"]:
            self.new_pass()
            for _ in range(state["taken"]):
                self.next_indices()


def subsample_limit(size: int, cap: int, fraction: float) -> int:
    """How many of `size` examples --subsample (a cap) or --subsample_fraction keep
    (0: all); a fraction keeps at least one, and the tasks' relative sizes."""
    return cap or math.ceil(fraction * size)


def subsample(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """A fixed random subset of at most `limit` examples (0 = all)."""
    if not limit or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)

