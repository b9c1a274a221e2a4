"""Cost of the data-parallel machinery: finetune-mix steps on the packaged checkpoint, 2 gloo
processes x 1 thread against 1 process x 2 threads on the SAME global batches (so the same
arithmetic), plain sum (DDP) and PCGrad (one all-reduce of the (K, P) task rows). On one
2-core CPU this measures overhead (collectives, duplicated Python), not a speedup. Also
prints the bytes all-reduced per step.

    python -m bench.dist [--steps 6] [--rounds 2] [--data_dir data]
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

from datasets import TrainStream
from engine import distributed, run
from engine.cli import parse_config
from engine.combiner import Combiner
from engine.configs import Combination, MultitaskConfig, default_data_dir
from engine.step import make_context, train_step
from multitask_classifier import build_tasks
from optimizer import AdamW


@dataclass
class DistBenchConfig:
    steps: int = field(default=6, metadata={"help": "timed steps per round and method"})
    rounds: int = field(default=2, metadata={"help": "rounds; the best is kept"})
    data_dir: str = field(default_factory=default_data_dir)
    checkpoint: str = ""
    seed: int = 0
    packed: bool = field(default=True, metadata={
        "help": "one encoder pass per step for all tasks (--no-packed: one per task)"})


def allreduce_bytes(num_elements: int, dtype: torch.dtype = torch.float32) -> int:
    """Payload of one all-reduce of `num_elements` values of `dtype`."""
    return num_elements * torch.empty((), dtype=dtype).element_size()


def ring_bytes_per_rank(payload: int, world_size: int) -> float:
    """What each rank sends (and receives) in a ring all-reduce of `payload` bytes:
    2 (W - 1) / W x payload (reduce-scatter, then all-gather)."""
    return 2 * (world_size - 1) / world_size * payload if world_size > 1 else 0.0


def time_steps(cfg: DistBenchConfig, dist: distributed.Dist, pcgrad: bool) -> tuple[float, int]:
    """Best seconds per step over the rounds, and the values all-reduced per step."""
    task_cfg = MultitaskConfig(data_dir=cfg.data_dir, checkpoint=cfg.checkpoint, seed=cfg.seed,
                               progress=False)
    s = run.setup(task_cfg, dist)
    tasks = build_tasks(task_cfg, s.tokenizer, s.encoder.config, ("train",))
    model = run.build_model(task_cfg, s.encoder, tasks, s.device).train()
    model.train_encoder(True)
    shared = [p for p in s.encoder.parameters() if p.requires_grad]
    surgery = Combiner.build(Combination("pcgrad"), shared, len(tasks), cfg.seed, dist, 2) \
        if pcgrad else None  # 2 micro-batches: no sparse rows, as under torchrun
    ctx = make_context(model, tasks, dist, model.precision, find_unused=False,
                       combined=shared if pcgrad else [], ddp=not pcgrad, packed=cfg.packed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the same global batches as one process with batch 2b: batch b per process x 2
    batch = {t.name: t.batch_size * 2 // dist.world_size for t in tasks}
    streams = [TrainStream(t.train, t.collate, batch[t.name], True, cfg.seed, 1, dist.rank,
                           dist.world_size) for t in tasks]
    optimizer = AdamW(model.parameters(), lr=1e-5)
    best = float("inf")
    for _ in range(cfg.rounds):
        train_step(ctx, tasks, [st.next_step() for st in streams], optimizer, surgery)  # warm-up
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(cfg.steps):
            train_step(ctx, tasks, [st.next_step() for st in streams], optimizer, surgery)
        distributed.barrier()
        best = min(best, (time.perf_counter() - start) / cfg.steps)
    values = (len(tasks) * sum(p.numel() for p in shared)
              + sum(p.numel() for p in ctx.unshared)) if pcgrad else sum(p.numel() for p in trainable)
    return best, values


def worker(rank: int, world: int, port: int, cfg: DistBenchConfig, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    dist = distributed.init_distributed(use_gpu=False)
    try:
        results = {name: time_steps(cfg, dist, pcgrad) for name, pcgrad in METHODS.items()}
        if dist.is_main:
            torch.save(results, os.path.join(out, "two.pt"))
    finally:
        distributed.shutdown()


METHODS = {"plain (sum)": False, "PCGrad": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    cfg = parse_config(DistBenchConfig, description=__doc__)
    torch.set_num_threads(2)
    single = distributed.Dist(0, 1, 0, torch.device("cpu"))
    one = {name: time_steps(cfg, single, pcgrad) for name, pcgrad in METHODS.items()}
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(2, free_port(), cfg, out), nprocs=2, join=True,
                           start_method="spawn")
        two = torch.load(os.path.join(out, "two.pt"), weights_only=True)
    print("finetune-mix steps, the same global batches (SST 16, Quora 32, STS 12), fp32, "
          f"{os.cpu_count()} CPUs")
    for name in METHODS:
        (t1, _), (t2, values) = one[name], two[name]
        payload = allreduce_bytes(values)
        print(f"{name:>12}: 1 process x 2 threads {1000 * t1:6.0f} ms/step, 2 gloo processes x 1 "
              f"thread {1000 * t2:6.0f} ms/step ({t2 / t1:.2f}x); all-reduced per step "
              f"{payload / 2**20:,.0f} MiB ({values:,} values; each rank sends "
              f"{ring_bytes_per_rank(payload, 2) / 2**20:,.0f} MiB in a ring)")


if __name__ == "__main__":
    main()
