"""The evaluation lever, A/B/C in one process: every dev set predicted by the same model in
three batchings, alternated round by round: file order in batches of 64 (the starter's
way), length-sorted batches of 64, and ours (evaluation.eval_batches: length-sorted, grown
to a token budget while padding stays under 5%). Prints each round's seconds, the medians,
their ratios to file order, and how far the outputs differ (padding changes only the float
rounding of the masked attention).

    python -m bench.evaluation [--data_dir DIR] [--checkpoint DIR] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from bench import multitask_model
from bench.limits import machine_header, set_threads
from engine.cli import parse_config, run_cli
from engine.configs import default_data_dir
from evaluation import EVAL_BATCH_SIZE, eval_batches, evaluated


@dataclass
class EvaluationBenchConfig:
    data_dir: str = field(default_factory=default_data_dir, metadata={"help": "data folder"})
    checkpoint: str = field(default="", metadata={
        "help": "HF-format BERT folder (default: the packaged all-MiniLM-L6-v2)"})
    max_length: int = 128
    rounds: int = field(default=3, metadata={"help": "alternating rounds"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})


def in_file_order(task, examples) -> list[list[int]]:
    n = len(examples)
    return [list(range(i, min(i + EVAL_BATCH_SIZE, n))) for i in range(0, n, EVAL_BATCH_SIZE)]


def sorted_by_length(task, examples) -> list[list[int]]:
    lengths = task.collate.lengths(examples)
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    return [order[i:i + EVAL_BATCH_SIZE] for i in range(0, len(order), EVAL_BATCH_SIZE)]


BATCHINGS = {"file order, 64": in_file_order, "sorted, 64": sorted_by_length,
             "sorted, token budget": eval_batches}


def timed_pass(model, tasks, batching, device) -> tuple[float, dict]:
    """Seconds to predict every task's dev set; the outputs by (task, example index)."""
    found = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for task in tasks:
            examples = task.examples("dev")
            for indices, _, output in evaluated(model, task, examples,
                                                batching(task, examples), device):
                found.update({(task.name, i): row for i, row in zip(indices, output.float())})
    return time.perf_counter() - start, found


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def main(argv=None) -> None:
    from multitask_classifier import MultitaskConfig
    cfg = parse_config(EvaluationBenchConfig, argv, description=__doc__.splitlines()[0])
    set_threads(cfg.threads)
    run_cfg = MultitaskConfig(checkpoint=cfg.checkpoint, data_dir=cfg.data_dir,
                              max_length=cfg.max_length, progress=False)
    s, tasks, model = multitask_model(run_cfg, ("dev",))
    model.eval()
    print(machine_header(s.device))
    print("dev examples: " + ", ".join(f"{t.name} {len(t.examples('dev'))}" for t in tasks) +
          "; batches: " + ", ".join(f"{name} {sum(len(b(t, t.examples('dev'))) for t in tasks)}"
                                    for name, b in BATCHINGS.items()))
    times, outputs = {name: [] for name in BATCHINGS}, {}
    for _ in range(cfg.rounds):
        for name, batching in BATCHINGS.items():
            seconds, outputs[name] = timed_pass(model, tasks, batching, s.device)
            times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    first = next(iter(BATCHINGS))
    for name, values in times.items():
        print(f"{name:>22}: " + " ".join(f"{v:.2f}" for v in values) + f" s; median "
              f"{medians[name]:.2f} s = {medians[name] / medians[first]:.2f}x {first}; largest "
              f"output difference from it {largest_difference(outputs[name], outputs[first]):.1e}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
