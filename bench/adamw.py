"""The sqrt-floor lever, A/B in one process: AdamW's denominator sqrt(v) + eps over a whole
optimizer state, a CHUNK at a time as the step runs it, plain and with v first clamped to
optimizer.sqrt_floor (the same bits: checked here), alternated round by round; prints each
round's ms, the medians and their ratio. The state is a run's (--state RUN/last.pt: its
first optimizer's v) or MiniLM-sized, its word embedding with --reached of its rows nonzero
(a fresh optimizer's: the rest keep v = 0, where sqrt is slow).

    python -m bench.adamw [--state runs/NAME/last.pt] [--reached 0.6] [--rounds 6] [--threads N]
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import optimizer
from base_bert import default_checkpoint_path, from_pretrained
from bench.limits import machine_header, set_threads
from engine.cli import parse_config, run_cli


@dataclass
class AdamWBenchConfig:
    state: str = field(default="", metadata={"help": "a run's last.pt (default: MiniLM-sized)"})
    reached: float = field(default=0.6, metadata={"help": "without --state: the fraction of "
                                                  "word-embedding rows with v > 0"})
    eps: float = 1e-6
    rounds: int = field(default=6, metadata={"help": "alternating rounds (plain, then floor)"})
    seed: int = 0
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})


def saved_v(path: str) -> torch.Tensor:
    saved = torch.load(path, weights_only=True, map_location="cpu")
    state = next(iter(saved["optimizers"].values()))["state"]
    return torch.cat([s["exp_avg_sq"].reshape(-1) for s in state.values()])


def minilm_v(reached: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model = from_pretrained(default_checkpoint_path())
    vs = [torch.randn(p.numel()).square_().mul_(1e-8) for p in model.parameters()]
    rows = model.word_embedding.weight
    v = vs[[p is rows for p in model.parameters()].index(True)].view(rows.shape)
    v[torch.randperm(len(v))[:round(len(v) * (1 - reached))]] = 0.0
    return torch.cat(vs)


def denominators(v: torch.Tensor, eps: float, floor: float, scratch: torch.Tensor) -> float:
    """ms for sqrt(v) + eps, CHUNK elements at a time into one reused scratch chunk, as the
    step runs it (floor 0: no clamp)."""
    start = time.perf_counter()
    for first in range(0, v.numel(), optimizer.CHUNK):
        part = v[first:first + optimizer.CHUNK]
        optimizer.denominator(part, eps, floor, scratch[:len(part)])
    return (time.perf_counter() - start) * 1000


def main(argv=None) -> None:
    cfg = parse_config(AdamWBenchConfig, argv, description=__doc__.splitlines()[0])
    set_threads(cfg.threads)
    v = saved_v(cfg.state) if cfg.state else minilm_v(cfg.reached, cfg.seed)
    floor = optimizer.sqrt_floor(cfg.eps, v.dtype)
    plain, floored = (optimizer.denominator(v, cfg.eps, f, torch.empty_like(v))
                      for f in (0.0, floor))
    same = torch.equal(plain.view(torch.int32), floored.view(torch.int32))
    del plain, floored
    scratch = torch.empty(optimizer.CHUNK, dtype=v.dtype)
    print(machine_header(torch.device("cpu")))
    print(f"v: {v.numel():,} elements, {(v == 0).float().mean():.1%} exact zeros; eps {cfg.eps:g}, "
          f"floor {floor:.3g}")
    times = {"plain": [], "floor": []}
    for _ in range(cfg.rounds):
        for name in times:
            times[name].append(denominators(v, cfg.eps, floor if name == "floor" else 0.0, scratch))
    for name, values in times.items():
        print(f"{name:>6}: " + " ".join(f"{t:.1f}" for t in values) + " ms")
    plain, floored = (statistics.median(values) for values in times.values())
    print(f"sqrt(v) + eps: median plain {plain:.1f} ms, floor {floored:.1f} ms: "
          f"{floored / plain:.3f}x; the same bits: {same}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
