"""Encoder throughput benchmark: padded tokens/s for training (forward + backward, and with
the AdamW step) and for inference, on the packaged checkpoint at batch 32 x length 64 with
random real lengths: our encoder padded (`model(**batch)`, as transformers runs) and packed
(`forward_many`: padding removed from the token-wise layers, as training runs it; outputs
equal at the real tokens). `--compare_hf` times transformers' BertModel on the same batches (if
transformers is installed) and prints our/their ratios. Then what bounds it on this machine
(bench/limits.py): the GEMM FLOPs of a step on the real and the padded tokens, AdamW's
memory traffic, the measured torch.mm rate at 2048^3 and at the step's shapes, and the
fraction of that peak each measurement reaches.

    python -m bench.encoder [--checkpoint DIR] [--batch_size 32] [--seq_len 64] [--steps 10]
        [--threads N] [--compare_hf] [--bf16]
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from base_bert import default_checkpoint_path, from_pretrained
from bench.limits import (adamw_line, flops_line, fraction_line, linear_shapes, machine_header,
                          measure_peaks, peak_for, peak_lines, read_cpu, set_threads,
                          step_flops, updated_elements)
from engine.cli import parse_config, run_cli
from optimizer import AdamW
from tokenizer import Encoded
from utils import choose_device


@dataclass
class BenchConfig:
    checkpoint: str = field(default="", metadata={"help": "HF BERT folder (default: packaged MiniLM)"})
    batch_size: int = 32
    seq_len: int = 64
    steps: int = field(default=10, metadata={"help": "timed steps per measurement"})
    warmup: int = 2
    repeats: int = field(default=2, metadata={"help": "alternating rounds; the best is kept"})
    seed: int = 0
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})
    compare_hf: bool = field(default=False, metadata={"help": "also time transformers' BertModel"})
    packed: bool = field(default=True, metadata={
        "help": "also time ours through forward_many (padding removed), as training runs it"})
    bf16: bool = field(default=False, metadata={"help": "also time ours under bfloat16 autocast"})
    use_gpu: bool = field(default=False, metadata={"help": "run on CUDA (when present)"})


def random_batch(cfg: BenchConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = torch.randint(8, cfg.seq_len + 1, (cfg.batch_size,), generator=gen)
    lengths[0] = cfg.seq_len  # the batch is padded to its longest item
    ids = torch.randint(1000, vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
    mask = (torch.arange(cfg.seq_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids)}


def sync() -> None:
    """CUDA runs asynchronously: time whole kernels, not their launches."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(fn: Callable[[], None], cfg: BenchConfig) -> float:
    """Padded tokens per second of `fn` over cfg.steps calls after cfg.warmup calls."""
    for _ in range(cfg.warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        fn()
    sync()
    return cfg.steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)


def measure(model: torch.nn.Module, batch: dict, cfg: BenchConfig,
            bf16: bool = False) -> dict[str, float]:
    opt = AdamW(model.parameters(), lr=1e-5)

    def forward() -> torch.Tensor:
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        return out.last_hidden_state.float().mean() + out.pooler_output.float().mean()

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        forward().backward()

    def train_step() -> None:
        forward_backward()
        opt.step()

    @torch.inference_mode()
    def inference() -> None:
        forward()

    model.train()
    results = {"fwd+bwd": rate(forward_backward, cfg), "fwd+bwd+AdamW": rate(train_step, cfg)}
    model.eval()
    results["inference"] = rate(inference, cfg)
    return results


class PackedEncoder(torch.nn.Module):
    """`encoder.forward_many` on one padded batch behind `model(**batch)`: the same
    parameters, the outputs at the real tokens equal to the padded forward's."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor):
        return self.encoder.forward_many([Encoded(input_ids, token_type_ids, attention_mask)])[0]


def hf_model(folder: str) -> torch.nn.Module | None:
    try:
        from transformers import BertModel as HFBertModel
    except ImportError:
        print("transformers is not installed: skipping the comparison")
        return None
    return HFBertModel.from_pretrained(folder, attn_implementation="sdpa")


def ratio_pairs(results: dict) -> list[tuple[str, str]]:
    """(row, base) pairs to print as ratios, each within one precision: every row against
    ours, ours packed against transformers, and bf16 against fp32 for each row."""
    pairs = []
    for suffix in ("", " bf16"):
        rows = [name for name in results if name.endswith(" bf16") == bool(suffix)]
        pairs += [(name, "ours" + suffix) for name in rows if name != "ours" + suffix]
        if {"ours packed" + suffix, "transformers" + suffix} <= set(rows):
            pairs.append(("ours packed" + suffix, "transformers" + suffix))
    pairs += [(name, name[:-len(" bf16")]) for name in results
              if name.endswith(" bf16") and name[:-len(" bf16")] in results]
    return pairs


def main() -> None:
    cfg = parse_config(BenchConfig, description=__doc__)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    folder = cfg.checkpoint or default_checkpoint_path()
    device = choose_device(cfg.use_gpu)
    ours = from_pretrained(folder).to(device)
    batch = {k: v.to(device) for k, v in random_batch(cfg, ours.config.vocab_size).items()}
    real = int(batch["attention_mask"].sum())
    print(machine_header(device))
    print(f"checkpoint {folder}\nbatch {cfg.batch_size} x {cfg.seq_len} "
          f"({real / batch['attention_mask'].numel():.0%} real tokens), "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}")
    models = {"ours": (ours, False)}
    if cfg.packed:
        models["ours packed"] = (PackedEncoder(ours), False)
    if cfg.compare_hf and (theirs := hf_model(folder)) is not None:
        models["transformers"] = (theirs.to(device), False)
    if cfg.bf16:  # each row again under bf16 autocast, so that ratios pair like with like
        models |= {f"{name} bf16": (model, True) for name, (model, _) in models.items()}
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for _ in range(cfg.repeats):  # alternate the models so that drift hits both alike
        for name, (model, bf16) in models.items():
            for key, value in measure(model, batch, cfg, bf16).items():
                results[name][key] = max(value, results[name].get(key, 0.0))
    width = max(map(len, results))
    for name, res in results.items():
        print(f"{name:>{width}}: " + ", ".join(f"{k} {v:,.0f} padded tokens/s" for k, v in res.items()))
    for name, base in ratio_pairs(results):
        print(f"  {name}/{base}: " + ", ".join(
            f"{k} {results[name][k] / results[base][k]:.2f}x" for k in results[base]))
    print_limits(ours, batch["attention_mask"], results, device)


def print_limits(model, mask: torch.Tensor, results: dict, device: torch.device) -> None:
    """FLOPs and bytes of a step, the machine's measured peaks and the fraction of them
    each measurement reached (its time per step from its padded tokens/s)."""
    config, padded_tokens = model.config, mask.numel()
    train, infer = step_flops(config, [mask]), step_flops(config, [mask], passes=1)
    print("Limits (bench/limits.py):")
    print(flops_line(train))
    print(flops_line(infer, "inference: forward"))
    shapes = [("batch (padded)", shape) for shape in linear_shapes(config, padded_tokens)]
    shapes += [("batch packed (real)", shape) for shape in linear_shapes(config, train.real_tokens)]
    peaks = measure_peaks(shapes, device, read_cpu())
    print("\n".join(peak_lines(peaks)))
    for name, res in results.items():
        peak, peak_name = peak_for(peaks, "bf16" if name.endswith("bf16") else "fp32")
        for key, tokens_per_second in res.items():
            flops = infer if key == "inference" else train  # AdamW: bytes, not FLOPs
            print(fraction_line(f"{name} {key}", flops, padded_tokens / tokens_per_second,
                                peak, peak_name))
    ours = results["ours"]
    # AdamW's time by difference: the same steps with and without it
    adamw = padded_tokens / ours["fwd+bwd+AdamW"] - padded_tokens / ours["fwd+bwd"]
    note = " (its time: ours with and without it)" if adamw > 0 else \
        "; with and without it, ours differ by no positive time (noise)"
    print(adamw_line(updated_elements(model.parameters()), adamw if adamw > 0 else None,
                     peaks.copy_gbps) + note)


if __name__ == "__main__":
    sys.exit(run_cli(main))
