"""Cost of the gradient aggregators: times finetune-mix steps (a batch of SST, Quora and STS
each, forward, backward, AdamW) on the packaged checkpoint, on the same real batches, in
rounds: the plain step (losses summed), the plain step with the gradient
diagnostics (the Gram matrix), every --aggregator and every --balance (on the sum).
Prints ms/step and the ratio to the plain step; then what bounds the step on this machine
(bench/limits.py): the encoder's GEMM FLOPs per step on the real and the padded tokens,
AdamW's memory traffic, the measured torch.mm rate at 2048^3 and at the step's own shapes,
the fraction of that peak the plain step reaches, and (bench/phases.py) each method's time
per phase: forward, backward, gradient combination, optimizer, other. --compile: also each
method with the step's forward compiled (bench/compiled.py): compile time, ms/step, ratio.
--profile N: each method's N steps under torch.profiler, its operators' self time per step
beside the plain step's (bench/profiles.py).

    python -m bench.mix [--steps 8] [--rounds 3] [--data_dir data] [--precision bf16]
        [--methods pcgrad,grad_norm] [--threads N] [--phase_rounds 1] [--compile]
        [--freeze_word_embeddings] [--no-row_gradients] [--profile 4]
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from bench import multitask_model
from bench.compiled import compiled_lines, time_compiled
from bench.limits import (StepFlops, adamw_line, flops_line, fraction_line, linear_shapes,
                          machine_header, measure_peaks, peak_for, peak_lines, read_cpu,
                          set_threads, step_flops, updated_elements)
from bench.phases import PhaseClock, phase_lines
from bench.profiles import operator_times, profile_lines
from datasets import make_loader
from engine.aggregators import AGGREGATORS
from engine.balancing import BALANCERS
from engine.cli import parse_config, run_cli
from engine.combiner import Combiner, LossWeights
from engine.configs import Combination, MultitaskConfig, default_data_dir
from engine.distributed import Dist
from engine.errors import ConfigError
from engine.names import COMPILE_MODES
from engine.row_gradients import use_row_gradients
from engine.step import make_context, train_step
from optimizer import AdamW
from pcgrad import PCGrad, gram_matrix

PLAIN, DIAGNOSTICS = "plain (sum)", "plain + diagnostics"


@dataclass
class MixBenchConfig:
    steps: int = field(default=8, metadata={"help": "timed steps per round and method"})
    rounds: int = field(default=3, metadata={"help": "rounds; per batch and method the best is kept"})
    methods: str = field(default="", metadata={
        "help": "comma-separated aggregators / balancings to time (default: all)"})
    data_dir: str = field(default_factory=default_data_dir)
    checkpoint: str = ""
    max_length: int = 128
    precision: str = field(default="fp32", metadata={
        "help": "bf16: time steps under bfloat16 autocast", "choices": ["fp32", "bf16", "auto"]})
    seed: int = 0
    use_gpu: bool = field(default=False, metadata={"help": "run on CUDA (when present)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    phase_rounds: int = field(default=1, metadata={
        "help": "rounds of the pass timing each phase apart (0: skip it)"})
    packed: bool = field(default=True, metadata={
        "help": "one encoder pass per step for all tasks (--no-packed: one per task)"})
    compile: bool = field(default=False, metadata={"help": (
        "also time each method with the training forward compiled as --compile trains "
        "(engine/compiling.py): the compile time (the first pass over the batches) apart, "
        "then ms/step and the ratio to eager. Compiling costs time (inductor on a small CPU: "
        "minutes); --compile stays off by default in training until this is measured")})
    compile_mode: str = field(default="default", metadata={
        "help": "inductor's mode with --compile", "choices": list(COMPILE_MODES)})
    freeze_word_embeddings: bool = field(default=False, metadata={
        "help": "time steps with the word embedding frozen, as the trainer's option runs them"})
    profile: int = field(default=0, metadata={
        "help": "steps each method takes under torch.profiler (0: none): a table of the "
                "operators' self time per step beside the plain step's (bench/profiles.py)"})
    profile_top: int = field(default=15, metadata={"help": "operators listed by --profile"})
    fused_attention: bool = field(default=True, metadata={
        "help": "attention through torch's scaled_dot_product_attention with its own dropout "
                "(the default); --no-fused_attention: the explicit form with bert.Dropout"})
    row_gradients: bool = field(default=True, metadata={
        "help": "the word embedding's gradient from the rows a step reaches, as the trainer "
                "installs it on a CPU (engine/row_gradients.py); --no-row_gradients: torch's "
                "dense embedding backward"})


def make_methods(shared: list, sparse_rows: list, num_tasks: int, chosen: str) -> dict:
    """name -> Combiner (None: the plain summed backward). Aggregators on unbalanced losses,
    balancings under the sum, each combining as the trainer does (balanced_weights); a
    loss-only combination (RLW, uncertainty, DWA, FAMO) as its steps outside the
    diagnostics run: LossWeights, one weighted backward."""
    names = chosen.split(",") if chosen else [*AGGREGATORS][1:] + [*BALANCERS][1:]
    unknown = set(names) - set(AGGREGATORS) - set(BALANCERS)
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(sorted(unknown))}; choose from "
                          f"{', '.join([*AGGREGATORS][1:] + [*BALANCERS][1:])}")
    methods = {PLAIN: None, DIAGNOSTICS: ("sum", "none")}
    for name in names:
        methods[name if name in AGGREGATORS else f"sum + {name}"] = \
            (name, "none") if name in AGGREGATORS else ("sum", name)
    for label, parts in methods.items():
        if parts is not None:
            buffer = PCGrad(shared, num_tasks, sparse_rows=sparse_rows)
            combiner = Combiner(Combination(parts[0], balance=parts[1]), buffer, num_tasks, 0)
            methods[label] = LossWeights(combiner) if combiner.loss_only else combiner
    return methods


def mix_step(model, tasks: list, batches: list, optimizer, combiner: Combiner | LossWeights | None,
             clock: PhaseClock | None = None, packed: bool = True) -> None:
    """One finetune-mix step on one process, as the trainer takes it; `clock` times its phases."""
    device = next(model.parameters()).device
    rows = isinstance(combiner, Combiner)
    ctx = make_context(model, tasks, Dist(0, 1, 0, device), model.precision, find_unused=False,
                       combined=combiner.params if rows else [], packed=packed)
    with clock.watch(ctx.local, optimizer, combiner if rows else None) if clock else nullcontext():
        train_step(ctx, tasks, [([b], len(b)) for b in batches], optimizer, combiner)


def build_model(cfg: MixBenchConfig):
    """The run's setup, tasks and model, its encoder trained as the trainer's build_parts
    sets it up (frozen word embedding, row gradients) for these flags."""
    task_cfg = MultitaskConfig(data_dir=cfg.data_dir, checkpoint=cfg.checkpoint, seed=cfg.seed,
                               precision=cfg.precision, progress=False, use_gpu=cfg.use_gpu,
                               max_length=cfg.max_length)
    s, tasks, model = multitask_model(task_cfg, ("train",))
    model.train()
    model.train_encoder(True)  # as the trainer does: the unread pooler stays out
    if cfg.freeze_word_embeddings:
        model.encoder.word_embedding.requires_grad_(False)
    model.encoder.set_fused_attention(cfg.fused_attention)
    if cfg.row_gradients:  # where the trainer installs them: CPU, one process, trainable
        use_row_gradients(model.encoder, s.device, distributed=False)
    return s, task_cfg, tasks, model


def main(argv=None) -> None:
    cfg = parse_config(MixBenchConfig, argv, description=__doc__)
    set_threads(cfg.threads)
    for name in ("phase_rounds", "profile", "profile_top"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be >= 0")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise ConfigError(f"--compile_mode {cfg.compile_mode} needs --compile")
    s, task_cfg, tasks, model = build_model(cfg)
    encoder = model.encoder
    shared = [p for p in encoder.parameters() if p.requires_grad]
    streams = [iter(make_loader(t.train, t.collate, t.batch_size, shuffle=True, bucket=True,
                                seed=cfg.seed)) for t in tasks]
    steps = [[next(s) for s in streams] for _ in range(cfg.steps + 1)]  # +1 warm-up step
    optimizer = AdamW(model.parameters(), lr=1e-5)
    methods = make_methods(shared, [encoder.word_embedding.weight], len(tasks), cfg.methods)
    for surgery in methods.values():  # warm-up: each method's buffers and first allocations
        mix_step(model, tasks, steps[0], optimizer, surgery, packed=cfg.packed)
    best = time_methods(model, tasks, steps[1:], optimizer, methods, cfg.rounds, cfg.packed)
    print(machine_header(s.device))
    print_ratios(cfg, task_cfg, model, tasks, steps[1:], methods, best)
    if cfg.compile:
        warmup, compiled = time_compiled(model, tasks, steps[1:], optimizer, methods, cfg.rounds,
                                         cfg.packed, cfg.compile_mode)
        print("\n".join(compiled_lines(best, warmup, compiled, cfg.steps, cfg.compile_mode)))
    phases = {} if not cfg.phase_rounds else \
        time_phases(model, tasks, steps[1:], optimizer, methods, cfg.phase_rounds, cfg.packed)
    print_limits(model, tasks, steps[1:], best[PLAIN], phases)
    if phases:
        print(f"Time per phase (bench/phases.py; a pass apart, best of {cfg.phase_rounds} "
              f"round(s) per step), mean ms/step and share:")
        print("\n".join(phase_lines(phases)))
    if cfg.profile:
        profiles = profile_methods(model, tasks, steps[1:], optimizer, methods, cfg)
        print(f"Operators (torch.profiler, {cfg.profile} step(s) per method, self time):")
        print("\n".join(profile_lines(profiles, PLAIN, cfg.profile_top)))


def time_methods(model, tasks: list, steps: list, optimizer, methods: dict, rounds: int,
                 packed: bool = True) -> dict:
    """Mean seconds per step of each method, the fastest round kept per batch."""
    # Each method runs each batch once a round, the methods in turn on the same batch, so
    # that drift on a shared machine hits all alike; per batch the fastest round is kept.
    device = next(model.parameters()).device
    best = {name: [float("inf")] * len(steps) for name in methods}
    for _ in range(rounds):
        for i, batches in enumerate(steps):
            for name, surgery in methods.items():
                start = time.perf_counter()
                mix_step(model, tasks, batches, optimizer, surgery, packed=packed)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(times) / len(steps) for name, times in best.items()}


def print_ratios(cfg: MixBenchConfig, task_cfg: MultitaskConfig, model, tasks: list, steps: list,
                 methods: dict, best: dict) -> None:
    """The ms/step and ratio table (other scripts and the READMEs quote its lines)."""
    tokens = sum(b.encoded.input_ids.numel() for batches in steps for b in batches) / cfg.steps
    print(f"{len(tasks)} tasks ({', '.join(f'{t.name} batch {t.batch_size}' for t in tasks)}), "
          f"{tokens:.0f} padded tokens/step, {torch.get_num_threads()} threads, "
          f"{model.precision.name}, {'packed' if cfg.packed else 'one pass per task'}, best of {cfg.rounds} rounds x {cfg.steps} steps")
    every = task_cfg.grad_diagnostics_every
    plain, diagnostics = best[PLAIN], best[DIAGNOSTICS]
    rows = list(best.items())
    # The trainer computes the diagnostics on one step in `every` (sum, no balancing): the
    # others are plain steps, so their cost per step is the mean of the two.
    rows.insert(2, (f"+ diagnostics 1 in {every}", plain + (diagnostics - plain) / every))
    print(f"{'method':>30}  ms/step  x plain")
    for name, seconds in rows:
        print(f"{name:>30}  {1000 * seconds:7.0f}  {seconds / plain:6.3f}x")
    grads = methods[DIAGNOSTICS].buffer.grads  # (K, P), the last step's real gradients
    blocked, single = (best_time(fn, grads) for fn in (gram_matrix, lambda g: g @ g.T))
    print(f"Gram matrix of ({grads.shape[0]}, {grads.shape[1]:,}): blocked {1000 * blocked:.1f} ms, "
          f"one matmul {1000 * single:.1f} ms ({single / blocked:.1f}x)")


def time_phases(model, tasks: list, steps: list, optimizer, methods: dict,
                rounds: int, packed: bool = True) -> dict[str, dict[str, float]]:
    """Per method, the mean seconds per step of each phase (bench/phases.py), on the same
    batches; per batch the round with the fastest total is kept."""
    clock = PhaseClock(next(model.parameters()).device)
    best: dict = {name: [None] * len(steps) for name in methods}
    for _ in range(rounds):
        for i, batches in enumerate(steps):
            for name, surgery in methods.items():
                mix_step(model, tasks, batches, optimizer, surgery, clock, packed)
                spent = clock.take()
                if best[name][i] is None or sum(spent.values()) < sum(best[name][i].values()):
                    best[name][i] = spent
    return {name: {phase: sum(s[phase] for s in per_step) / len(steps) for phase in per_step[0]}
            for name, per_step in best.items()}


def profile_methods(model, tasks: list, steps: list, optimizer, methods: dict,
                    cfg: MixBenchConfig) -> dict[str, dict[str, float]]:
    """Per method, operator -> ms per step over its first --profile batches (cycled)."""
    device = next(model.parameters()).device
    chosen = [steps[i % len(steps)] for i in range(cfg.profile)]

    def run(surgery):
        for batches in chosen:
            mix_step(model, tasks, batches, optimizer, surgery, packed=cfg.packed)
    return {name: operator_times(lambda: run(surgery), cfg.profile, device)
            for name, surgery in methods.items()}


def print_limits(model, tasks: list, steps: list, plain: float, phases: dict) -> None:
    """FLOPs and bytes of the step, the machine's measured peaks, the fraction reached."""
    config, count = model.encoder.config, len(steps)
    per_step = [step_flops(config, [b.encoded.attention_mask for b in batches]) for batches in steps]
    flops = StepFlops(*(round(sum(getattr(f, k) for f in per_step) / count) for k in
                        ("real", "padded", "real_tokens", "padded_tokens")))
    print(f"Limits of the step (bench/limits.py; means over the {count} steps' real batches):")
    print(flops_line(flops))
    rows = {t.name: round(sum(batches[k].encoded.attention_mask.numel() for batches in steps)
                          / count) for k, t in enumerate(tasks)}
    labelled = [(f"{name} batch (padded)", rows[name]) for name in rows]
    labelled += [("all tasks packed (padded)", flops.padded_tokens),
                 ("all tasks packed (real)", flops.real_tokens)]
    shapes = [(label, shape) for label, n in labelled for shape in linear_shapes(config, n)]
    peaks = measure_peaks(shapes, next(model.parameters()).device, read_cpu())
    print("\n".join(peak_lines(peaks)))
    peak, peak_name = peak_for(peaks, model.precision.name)
    print(fraction_line(f"{PLAIN} step, {model.precision.name}", flops, plain, peak, peak_name))
    seconds = phases[PLAIN]["optimizer"] if phases else None
    print(adamw_line(updated_elements(model.parameters()), seconds, peaks.copy_gbps))


def best_time(fn, *args, repeats: int = 10) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    sys.exit(run_cli(main))
