"""bench.mix --compile: each method's step with TaskLosses compiled (engine/compiling.py, as
--compile trains) against the same step eager, on the same batches. The compile time is
the warm-up pass over all the batches (every shape they bring compiled then) less what that
pass costs eager; then steady-state ms/step, the best of the rounds per batch, as
bench.mix's eager rows. MINBERT_COMPILE_BACKEND=eager times Dynamo's overhead alone."""
from __future__ import annotations

import time

import torch
from torch._dynamo.utils import counters

from engine.compiling import compile_backend, compile_losses
from engine.distributed import Dist
from engine.step import make_context, train_step


def compiled_contexts(model, tasks: list, methods: dict, packed: bool, mode: str) -> dict:
    """name -> a StepContext whose TaskLosses is compiled: one per method, made once (the
    trainer makes one per run; a new module per step would compile again)."""
    device = next(model.parameters()).device
    contexts = {}
    for name, combiner in methods.items():
        ctx = make_context(model, tasks, Dist(0, 1, 0, device), model.precision, find_unused=False,
                           combined=combiner.params if combiner is not None else [], packed=packed)
        contexts[name] = ctx
        compile_losses(ctx.local, mode, device)
    return contexts


def timed_step(ctx, tasks: list, batches: list, optimizer, combiner) -> float:
    start = time.perf_counter()
    train_step(ctx, tasks, [([b], len(b)) for b in batches], optimizer, combiner)
    if ctx.dist.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_compiled(model, tasks: list, steps: list, optimizer, methods: dict, rounds: int,
                  packed: bool, mode: str) -> tuple[dict, dict]:
    """Per method: the seconds of the warm-up pass over `steps` (compiling included) and
    the mean seconds per step afterwards (the fastest round kept per batch)."""
    contexts = compiled_contexts(model, tasks, methods, packed, mode)
    warmup = {name: sum(timed_step(contexts[name], tasks, batches, optimizer, combiner)
                        for batches in steps) for name, combiner in methods.items()}
    best = {name: [float("inf")] * len(steps) for name in methods}
    for _ in range(rounds):
        for i, batches in enumerate(steps):
            for name, combiner in methods.items():
                seconds = timed_step(contexts[name], tasks, batches, optimizer, combiner)
                best[name][i] = min(best[name][i], seconds)
    return warmup, {name: sum(times) / len(steps) for name, times in best.items()}


def compiled_lines(eager: dict, warmup: dict, compiled: dict, count: int, mode: str) -> list[str]:
    """The table: compile time (the warm-up pass less `count` eager steps), eager and
    compiled ms/step, and their ratio."""
    graphs = counters["stats"]["unique_graphs"]
    lines = [f"torch.compile ({compile_backend()}, mode {mode}, dynamic shapes; {graphs} graphs "
             f"compiled), the same {count} batches:",
             "(compiled graphs are shared: a method whose passes an earlier one compiled "
             "shows ~0 compile s)",
             f"{'method':>30}  compile s  eager ms/step  compiled ms/step  x eager"]
    for name, seconds in compiled.items():
        compile_s = warmup[name] - count * eager[name]
        lines.append(f"{name:>30}  {compile_s:9.1f}  {1000 * eager[name]:13.0f}  "
                     f"{1000 * seconds:16.0f}  {seconds / eager[name]:6.3f}x")
    return lines
