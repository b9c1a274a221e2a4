"""Where a method's step spends its time, operator by operator: torch.profiler's self time
per operator (CPU time on a CPU; on a GPU the kernels' device time) over the same batches
for each method, in ms per step, beside the plain step's, so that the table shows what an
aggregator adds (the Gram matrix's bmm, the weighted sum's adds, the per-task products of
the backward) and what the plain step's own time is made of. The profiler's overhead
inflates the many small operators; read the table for shares and differences, the ms/step
table for speed."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

OTHERS = "(all other operators)"


def operator_times(run: Callable[[], None], steps: int, device: torch.device) -> dict[str, float]:
    """ms per step of each operator's self time while `run` takes `steps` steps (on CUDA
    the device time: the CPU's there is mostly kernel launches)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    spent: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        spent[event.key] += own / 1000 / steps  # us -> ms, per step
    return dict(spent)


def profile_lines(profiles: dict[str, dict[str, float]], plain: str, top: int) -> list[str]:
    """A table: the `top` operators (by the largest time or difference any method shows),
    each method's ms per step and, after the first, the difference from `plain`."""
    names = list(profiles)
    base = profiles[plain]
    score = defaultdict(float)
    for method, spent in profiles.items():
        for op, ms in spent.items():
            score[op] = max(score[op], ms, abs(ms - base.get(op, 0.0)))
    chosen = sorted(score, key=score.get, reverse=True)[:top]
    rows = {op: [profiles[m].get(op, 0.0) for m in names] for op in chosen}
    rows[OTHERS] = [sum(ms for op, ms in profiles[m].items() if op not in rows) for m in names]
    rows["total"] = [sum(profiles[m].values()) for m in names]
    width = max(len(op) for op in rows)
    head = f"{'operator (self time, ms/step)':>{width}}  " + "  ".join(
        f"{m[:22]:>22}" if m == plain else f"{m[:14]:>14} {'- plain':>7}" for m in names)
    lines = [head]
    for op, values in rows.items():
        cells = [f"{v:22.2f}" if m == plain else f"{v:14.2f} {v - values[names.index(plain)]:+7.2f}"
                 for m, v in zip(names, values)]
        lines.append(f"{op:>{width}}  " + "  ".join(cells))
    return lines
