"""The dropout lever, A/B in one process: the packaged encoder's forward + backward in
training mode with its dropouts as bert.Dropout (the CPU mask from uniform >= p) and then
swapped for torch's nn.Dropout (bernoulli_), alternated round by round on the same batch;
prints each round's ms, the medians and their ratio.

    python -m bench.dropout [--rounds 8] [--steps 3] [--batch_size 32] [--seq_len 22] [--threads N]
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import bert
from base_bert import default_checkpoint_path, from_pretrained
from bench.limits import machine_header, set_threads
from engine.cli import parse_config, run_cli

KINDS = {"nn.Dropout": nn.Dropout, "bert.Dropout": bert.Dropout}


@dataclass
class DropoutBenchConfig:
    rounds: int = field(default=8, metadata={"help": "alternating rounds (A then B)"})
    steps: int = field(default=3, metadata={"help": "timed steps per round and kind"})
    batch_size: int = 32
    seq_len: int = field(default=22, metadata={"help": "tokens per sequence (a mix step's size)"})
    seed: int = 0
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})


def use(model: nn.Module, kind: type) -> None:
    """Every dropout module of `model` replaced by `kind` with the same p."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Dropout, bert.Dropout)):
                setattr(module, name, kind(child.p))


def timed(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    """ms per forward + backward, after one untimed step."""
    def step():
        model(ids, mask).last_hidden_state.sum().backward()
        model.zero_grad(set_to_none=True)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main(argv=None) -> None:
    cfg = parse_config(DropoutBenchConfig, argv, description=__doc__.splitlines()[0])
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = from_pretrained(default_checkpoint_path()).train()
    ids = torch.randint(1000, model.config.vocab_size, (cfg.batch_size, cfg.seq_len))
    mask = torch.ones_like(ids)
    print(machine_header(torch.device("cpu")))
    times = {name: [] for name in KINDS}
    for _ in range(cfg.rounds):
        for name, kind in KINDS.items():
            use(model, kind)
            times[name].append(timed(model, ids, mask, cfg.steps))
    for name, values in times.items():
        print(f"{name:>12}: " + " ".join(f"{v:.0f}" for v in values) + " ms")
    before, after = (statistics.median(times[name]) for name in KINDS)
    print(f"encoder forward + backward, B{cfg.batch_size} x T{cfg.seq_len}, training: median "
          f"nn.Dropout {before:.0f} ms, bert.Dropout {after:.0f} ms: {after / before:.3f}x")


if __name__ == "__main__":
    sys.exit(run_cli(main))
