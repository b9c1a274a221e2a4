"""What bounds a training step on this machine, for the benchmarks (bench/mix.py,
bench/encoder.py): the step's matrix-multiply FLOPs, the AdamW pass's memory traffic, this
machine's measured torch.mm rate and copy bandwidth, and the CPU they ran on. Nothing here
prints: the benchmarks print the lines these functions return.

FLOPs of the encoder (a multiply-add counts 2), per layer, for one sequence of L tokens,
hidden size H, intermediate size I (bert.BertLayer's GEMMs):
    query, key, value projections   3 x 2 L H H
    attention scores Q K^T          2 L L H      (heads x L x L x H/heads)
    context  softmax(.) V           2 L L H
    attention output projection     2 L H H
    feed-forward in and out         2 L H I + 2 L I H
    total                           L (8 H^2 + 4 H I) + 4 L^2 H
The forward pass is num_hidden_layers times that, summed over the batch's sequences; the
backward pass ~2x the forward (each GEMM's input gradient and weight gradient are one GEMM
of the forward's size each), so forward + backward = 3x the forward. Left out: embeddings
(lookups), the pooler (2 H^2 per sequence) and the heads, softmax, GELU, layer norms and
dropout (not GEMMs; together about 1%). "real" counts each sequence at its attention-mask
length, "padded" at the batch's padded length (what a padded forward computes).

AdamW is memory-bound, so it is counted in bytes: per fp32 parameter element one fused
pass reads p, g, m, v and writes p, m, v (7 accesses, 28 bytes); optimizer.AdamW's seven
in-place ops touch 18 tensors per element (m.mul_ 2, m.add_ 3, v.mul_ 2, v.addcmul_ 3,
v.sqrt() 2, .add_(eps) 2, p.addcdiv_ 4; each tensor an op reads or writes counted once).
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from engine.errors import ConfigError

TRAIN_PASSES = 3  # forward + backward (~2x the forward), in forwards
ADAMW_FUSED_ACCESSES = 7  # the least any AdamW can do: read p, g, m, v; write p, m, v
ADAMW_OURS_ACCESSES = 18  # optimizer.AdamW as written (module docstring), weight decay off


def layer_flops(length: int, hidden: int, intermediate: int) -> int:
    """Forward GEMM FLOPs of one encoder layer on one sequence of `length` tokens."""
    return length * (8 * hidden * hidden + 4 * hidden * intermediate) + 4 * length * length * hidden


def encoder_flops(config, lengths: Iterable[int], passes: int = TRAIN_PASSES) -> int:
    """GEMM FLOPs of `passes` forwards' worth (3: forward + backward) of the encoder
    (`config`: a BertConfig) over sequences of the given lengths."""
    per_layer = sum(layer_flops(int(n), config.hidden_size, config.intermediate_size)
                    for n in lengths)
    return passes * config.num_hidden_layers * per_layer


@dataclass(frozen=True)
class StepFlops:
    real: int  # at each sequence's attention-mask length
    padded: int  # at the batch's padded length
    real_tokens: int
    padded_tokens: int


def step_flops(config, masks: Sequence[torch.Tensor], passes: int = TRAIN_PASSES) -> StepFlops:
    """FLOPs of the encoder passes over a step's batches, given their (N, T) attention masks
    (one encoder call per mask, as the step makes them)."""
    real = padded = real_tokens = padded_tokens = 0
    for mask in masks:
        lengths = mask.sum(1).tolist()
        real += encoder_flops(config, lengths, passes)
        padded += encoder_flops(config, [mask.shape[1]] * mask.shape[0], passes)
        real_tokens += int(sum(lengths))
        padded_tokens += mask.numel()
    return StepFlops(real, padded, real_tokens, padded_tokens)


def updated_elements(params: Iterable[torch.nn.Parameter]) -> int:
    """Parameter elements AdamW updates: those that get a gradient."""
    return sum(p.numel() for p in params if p.requires_grad)


def adamw_bytes(elements: int, accesses: int, element_size: int = 4) -> int:
    return elements * accesses * element_size


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset  # empty when unknown (no /proc/cpuinfo)

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matrix products run natively (else oneDNN emulates them in fp32)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    def describe(self) -> str:
        if not self.flags:
            return f"{self.model} (instruction flags unknown: no /proc/cpuinfo)"
        has = {name: "yes" if any(f.startswith(name) for f in self.flags) else "no"
               for name in ("avx2", "avx512f", "avx512_bf16", "amx")}
        return f"{self.model} ({', '.join(f'{k} {v}' for k, v in has.items())})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags in /proc/cpuinfo's format."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or "unknown CPU", flags)


def read_cpu(path: str = "/proc/cpuinfo") -> CpuInfo:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return parse_cpuinfo("")


def set_threads(threads: int) -> None:
    """--threads: 0 keeps torch's default."""
    if threads < 0:
        raise ConfigError(f"--threads {threads}: must be >= 0 (0: torch's default)")
    if threads:
        torch.set_num_threads(threads)


def machine_header(device: torch.device, cpu: CpuInfo | None = None) -> str:
    """One line naming the CPU (and GPU), the thread count and torch."""
    cpu = cpu or read_cpu()
    line = (f"CPU: {cpu.describe()}, torch kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if device.type == "cuda":
        line += f"; GPU: {torch.cuda.get_device_name(device)}"
    return line


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: time whole kernels, not their launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int, min_seconds: float) -> float:
    """Best time of one call of `fn`, over `repeats` timed loops of enough calls to last
    `min_seconds` (after one untimed warm-up call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    calls = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def gemm_gflops(rows: int, inner: int, cols: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", repeats: int = 3,
                min_seconds: float = 0.05) -> float:
    """Measured GFLOP/s of torch.mm for (rows, inner) @ (inner, cols), with the weight in
    nn.Linear's (cols, inner) layout read transposed, as the encoder's layers run it."""
    device = torch.device(device)
    x = torch.randn(rows, inner, dtype=dtype, device=device)
    weight = torch.randn(cols, inner, dtype=dtype, device=device)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    seconds = best_seconds(lambda: torch.mm(x, weight.t(), out=out), device, repeats, min_seconds)
    return 2 * rows * inner * cols / seconds / 1e9


def copy_gbps(device: torch.device | str = "cpu", megabytes: int = 64, repeats: int = 3) -> float:
    """Measured memory bandwidth of a large tensor copy (bytes read + written per second),
    the bound of a memory-bound pass such as AdamW's."""
    device = torch.device(device)
    src = torch.ones(megabytes * 2 ** 18, device=device)  # 4-byte elements
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device, repeats, 0.05)
    return 2 * src.numel() * 4 / seconds / 1e9


def linear_shapes(config, rows: int) -> list[tuple[int, int, int]]:
    """The (rows, inner, cols) of an encoder layer's linear GEMMs on `rows` tokens."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return [(rows, hidden, hidden), (rows, hidden, inter), (rows, inter, hidden)]


@dataclass
class Peaks:
    """GFLOP/s by (label, shape) and dtype; bf16 is None where it is emulated."""
    rows: list  # [(label, (m, k, n), fp32 GFLOP/s, bf16 GFLOP/s or None)]
    copy_gbps: float
    native_bf16: bool

    @property
    def fp32(self) -> float:
        return self.rows[0][2]

    @property
    def bf16(self) -> float | None:
        return self.rows[0][3]


def measure_peaks(shapes: list[tuple[str, tuple[int, int, int]]], device: torch.device,
                  cpu: CpuInfo, size: int = 2048) -> Peaks:
    """torch.mm at a large square shape (the peak) and at each of `shapes`, in fp32 and,
    where it is native (a GPU, or a CPU with avx512_bf16/amx_bf16), in bf16."""
    native = device.type == "cuda" or cpu.native_bf16
    rows = []
    for label, shape in [(f"{size}^3", (size, size, size)), *shapes]:
        bf16 = gemm_gflops(*shape, dtype=torch.bfloat16, device=device) if native else None
        rows.append((label, shape, gemm_gflops(*shape, device=device), bf16))
    return Peaks(rows, copy_gbps(device), native)


def peak_lines(peaks: Peaks) -> list[str]:
    bf16_note = "" if peaks.native_bf16 else " (bf16 emulated: not measured)"
    lines = [f"GEMM rate (torch.mm, x @ W.T, best of 3), GFLOP/s{bf16_note}:",
             f"{'shape':>34}  {'rows x in x out':>18}  {'fp32':>7}  {'bf16':>7}"]
    for label, (m, k, n), fp32, bf16 in peaks.rows:
        lines.append(f"{label:>34}  {f'{m} x {k} x {n}':>18}  {fp32:7.1f}  "
                     f"{'emul.' if bf16 is None else f'{bf16:.1f}':>7}")
    lines.append(f"memory copy bandwidth: {peaks.copy_gbps:.1f} GB/s (read + write)")
    return lines


def peak_for(peaks: Peaks, precision: str) -> tuple[float, str]:
    """The peak a step in `precision` (fp32, bf16, fp16) is measured against: the bf16 rate
    for a half-precision step where bf16 is native, else the fp32 rate."""
    if precision == "fp32":
        return peaks.fp32, "fp32"
    if peaks.bf16 is not None:
        return peaks.bf16, "bf16"
    return peaks.fp32, "fp32 (bf16 emulated)"


def fraction_line(label: str, flops: StepFlops, seconds: float, peak: float, peak_name: str) -> str:
    """FLOPs / time / peak, for the padded and the real tokens."""
    padded, real = flops.padded / seconds / 1e9, flops.real / seconds / 1e9
    return (f"{label}: {1000 * seconds:.0f} ms -> padded {padded:.1f} GFLOP/s = "
            f"{padded / peak:.1%}, real {real:.1f} GFLOP/s = {real / peak:.1%} "
            f"of the {peak_name} peak ({peak:.1f})")


def flops_line(flops: StepFlops, what: str = "forward + backward") -> str:
    return (f"encoder GEMM FLOPs ({what}): real {flops.real / 1e9:.2f} GFLOP "
            f"({flops.real_tokens:,} tokens), padded {flops.padded / 1e9:.2f} GFLOP "
            f"({flops.padded_tokens:,} tokens)")


def adamw_line(elements: int, seconds: float | None = None, copy: float | None = None) -> str:
    """AdamW's traffic in bytes; with its measured time, the bandwidth that means."""
    least, ours = (adamw_bytes(elements, a) for a in (ADAMW_FUSED_ACCESSES, ADAMW_OURS_ACCESSES))
    line = (f"AdamW: {elements:,} parameters, memory traffic {least / 1e6:,.0f} MB at the least "
            f"(one fused pass), {ours / 1e6:,.0f} MB as optimizer.AdamW runs")
    if seconds is not None and seconds > 0:
        line += (f"; in {1000 * seconds:.1f} ms: {least / seconds / 1e9:.1f} / "
                 f"{ours / seconds / 1e9:.1f} GB/s")
        if copy:
            line += f" (copy bandwidth {copy:.1f})"
    return line
