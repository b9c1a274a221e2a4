"""Cost of PCGrad: times finetune-mix steps (a batch of SST, Quora and STS each, forward,
backward, AdamW) on the packaged checkpoint, plain (losses summed) against PCGrad, on the
same real batches, alternating rounds. Prints ms/step and the PCGrad/plain ratio.

    python bench_mix.py [--steps 8] [--rounds 3] [--data_dir data] [--precision bf16]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import run
from cli import parse_config
from datasets import default_data_dir, make_loader
from multitask_classifier import MultitaskConfig, build_tasks
from optimizer import AdamW
from pcgrad import PCGrad, gram_matrix
from trainer import mix_step


@dataclass
class MixBenchConfig:
    steps: int = field(default=8, metadata={"help": "timed steps per round and method"})
    rounds: int = field(default=3, metadata={"help": "alternating rounds; the best is kept"})
    data_dir: str = field(default_factory=default_data_dir)
    checkpoint: str = ""
    precision: str = field(default="fp32", metadata={
        "help": "bf16: time steps under bfloat16 autocast", "choices": ["fp32", "bf16", "auto"]})
    seed: int = 0


def main() -> None:
    cfg = parse_config(MixBenchConfig, description=__doc__)
    task_cfg = MultitaskConfig(data_dir=cfg.data_dir, checkpoint=cfg.checkpoint, seed=cfg.seed,
                               precision=cfg.precision, progress=False)
    s = run.setup(task_cfg)
    encoder = s.encoder
    tasks = build_tasks(task_cfg, s.tokenizer, encoder.config, ("train",))
    model = run.build_model(task_cfg, encoder, tasks, s.device).train()
    model.train_encoder(True)  # as the trainer does: the unread pooler stays out
    shared = [p for p in encoder.parameters() if p.requires_grad]
    streams = [iter(make_loader(t.train, t.collate, t.batch_size, shuffle=True, bucket=True,
                                seed=cfg.seed)) for t in tasks]
    steps = [[next(s) for s in streams] for _ in range(cfg.steps + 1)]  # +1 warm-up step
    optimizer = AdamW(model.parameters(), lr=1e-5)
    methods = {
        "plain (sum)": None,
        "plain + diagnostics": PCGrad(shared, len(tasks), project=False),
        "PCGrad": PCGrad(shared, len(tasks), project=True),
    }
    best = {name: float("inf") for name in methods}
    for _ in range(cfg.rounds):  # alternate, so that drift on a shared machine hits all alike
        for name, surgery in methods.items():
            mix_step(model, tasks, steps[0], optimizer, surgery)
            start = time.perf_counter()
            for batches in steps[1:]:
                mix_step(model, tasks, batches, optimizer, surgery)
            best[name] = min(best[name], (time.perf_counter() - start) / cfg.steps)
    tokens = sum(b.encoded.input_ids.numel() for batches in steps[1:] for b in batches) / cfg.steps
    print(f"{len(tasks)} tasks ({', '.join(f'{t.name} batch {t.batch_size}' for t in tasks)}), "
          f"{tokens:.0f} padded tokens/step, {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if model.bf16 else 'fp32'}")
    for name, seconds in best.items():
        print(f"{name:>20}: {1000 * seconds:7.0f} ms/step, {tokens / seconds:,.0f} padded tokens/s, "
              f"{seconds / best['plain (sum)']:.3f}x plain")
    grads = methods["PCGrad"].grads  # (K, P), the last step's real gradients
    blocked, single = (best_time(fn, grads) for fn in (gram_matrix, lambda g: g @ g.T))
    print(f"Gram matrix of ({grads.shape[0]}, {grads.shape[1]:,}): blocked {1000 * blocked:.1f} ms, "
          f"one matmul {1000 * single:.1f} ms ({single / blocked:.1f}x)")


def best_time(fn, *args, repeats: int = 10) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    main()
