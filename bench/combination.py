"""The combination phase of a Gram-reading step (an aggregator, a balancing, the sampled
diagnostics) against its memory bound, with the alternatives tried and dropped: on a
(K, P) buffer of the packaged encoder's dense parameters (pcgrad.PCGrad's layout; the
word embedding's few live rows are left out), each way timed in turn, round by round,
and the medians printed with their ratio to ours:

    read bound     one sum over the buffer (a plain read of its K x P floats)
    Gram matrix    ours (pcgrad.gram_matrix: a bmm over column blocks), one matmul, and a
                   Gram per parameter just after its K rows are written (the block still
                   in cache, as a backward hook would) against the same writes then ours
    weighted sum   ours (pcgrad.weighted_sum: K scaled adds), the same in chunks of
                   optimizer.CHUNK columns, and torch.matmul(w, rows)

Every alternative is checked against ours: its largest difference, relative to the
largest value, is printed (float rounding; an error past 1e-3 stops the bench).

    python -m bench.combination [--tasks 3] [--rounds 15] [--threads N]
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from base_bert import default_checkpoint_path, from_pretrained
from bench.limits import machine_header, set_threads
from engine.cli import parse_config, run_cli
from optimizer import CHUNK
from pcgrad import gram_matrix, weighted_sum


@dataclass
class CombinationBenchConfig:
    tasks: int = field(default=3, metadata={"help": "K, rows of the buffer"})
    rounds: int = field(default=15, metadata={"help": "timed rounds (each way once a round)"})
    seed: int = 0
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})


def dense_sizes() -> list[int]:
    """The packaged encoder's parameters but the word embedding, in the buffer's order."""
    model = from_pretrained(default_checkpoint_path())
    words = model.word_embedding.weight
    return [p.numel() for p in model.parameters() if p is not words]


def chunked_sum(rows: torch.Tensor, weights: list[float], out: torch.Tensor) -> None:
    for first in range(0, rows.shape[1], CHUNK):
        weighted_sum(rows[:, first:first + CHUNK], weights, out[first:first + CHUNK])


def write_rows(buffer: torch.Tensor, grads: list[torch.Tensor], sizes: list[int],
               gram_each: bool) -> torch.Tensor:
    """Each parameter's K rows copied in (a backward's writes); `gram_each`: its Gram
    block summed right after, else ours over the whole buffer at the end."""
    gram, offset = torch.zeros(len(grads), len(grads)), 0
    for size in sizes:
        part = buffer[:, offset:offset + size]  # (K, size)
        for k, grad in enumerate(grads):
            part[k].copy_(grad[offset:offset + size])
        if gram_each:
            gram += gram_matrix(part)
        offset += size
    return gram if gram_each else gram_matrix(buffer)


def ways(buffer: torch.Tensor, grads: list[torch.Tensor], sizes: list[int],
         weights: list[float]) -> dict[str, tuple[str, Callable]]:
    """name -> (the way it is checked against, the call: returns its result)."""
    w = torch.tensor(weights)[None]  # (1, K)
    ours, chunked = torch.empty(buffer.shape[1]), torch.empty(buffer.shape[1])  # (P,) each

    def summed(fn, out):
        fn(buffer, weights, out)
        return out
    return {
        "read (sum)": ("", lambda: buffer.sum()),
        "gram: ours (blocked bmm)": ("", lambda: gram_matrix(buffer)),
        "gram: one matmul": ("gram: ours (blocked bmm)", lambda: buffer @ buffer.T),
        "write, then ours": ("", lambda: write_rows(buffer, grads, sizes, False)),
        "write + gram per parameter": ("write, then ours",
                                       lambda: write_rows(buffer, grads, sizes, True)),
        "weighted sum: ours": ("", lambda: summed(weighted_sum, ours)),
        "weighted sum: chunked": ("weighted sum: ours", lambda: summed(chunked_sum, chunked)),
        "weighted sum: matmul(w, rows)": ("weighted sum: ours",
                                          lambda: torch.matmul(w, buffer).squeeze(0)),
    }


def differences(named: dict) -> dict[str, float]:
    """Each alternative's largest difference from its reference, relative to the
    reference's largest value: float rounding only, or the alternative is wrong."""
    found = {}
    for name, (reference, call) in named.items():
        if reference:
            mine, theirs = call(), named[reference][1]()
            found[name] = ((mine - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30)).item()
            if not found[name] <= 1e-3:
                raise RuntimeError(f"{name} differs from {reference} by {found[name]:.1e}")
    return found


def main(argv=None) -> None:
    cfg = parse_config(CombinationBenchConfig, argv, description=__doc__.splitlines()[0])
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sizes = dense_sizes()
    total = sum(sizes)
    grads = [torch.randn(total) for _ in range(cfg.tasks)]
    buffer = torch.stack(grads)  # (K, P)
    weights = torch.rand(cfg.tasks).tolist()
    named = ways(buffer, grads, sizes, weights)
    found = differences(named)
    print(machine_header(torch.device("cpu")))
    times: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(cfg.rounds + 1):  # the first round warms up: not kept
        for name, (_, call) in named.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    print(f"buffer ({cfg.tasks}, {total:,}) fp32 ({buffer.numel() * 4 / 1e6:.0f} MB), "
          f"{len(sizes)} parameters; median of {cfg.rounds} rounds")
    for name, (reference, _) in named.items():
        ms = statistics.median(times[name][1:])
        against = reference or ("read (sum)" if name != "read (sum)" else "")
        ratio = f"{ms / statistics.median(times[against][1:]):6.2f}x {against}" if against else ""
        error = f"  (largest difference {found[name]:.1e})" if name in found else ""
        print(f"{name:>32}  {ms:7.2f} ms  {ratio}{error}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
