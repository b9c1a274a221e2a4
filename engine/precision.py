"""--precision in one place: the autocast dtype a run computes in, and the loss scaling
that fp16 needs, chosen once from the flag and the device."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.names import PRECISIONS

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bfloat16 natively: emulated bf16 (a CPU without
    AVX512-BF16 or AMX, a V100 or T4) is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """fp32 (no autocast), bf16 or fp16 autocast around the forward pass; weights, optimizer
    and losses stay fp32. fp16 also scales the loss (a GradScaler) so that small gradients
    survive float16's range."""
    name: str  # fp32, bf16 or fp16: what `auto` resolved to
    device_type: str

    @classmethod
    def resolve(cls, flag: str, device: torch.device) -> "Precision":
        """`auto`: bf16 where the hardware computes it natively, else fp16 on a GPU (with
        loss scaling) and fp32 on a CPU."""
        if flag not in PRECISIONS:
            raise ValueError(f"unknown precision {flag!r}; choose from {', '.join(PRECISIONS)}")
        if flag == "auto":
            flag = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
        return cls(flag, device.type)

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    @property
    def scales_loss(self) -> bool:
        return self.name == "fp16"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.scales_loss else None

    def describe(self) -> str:
        return "" if self.dtype is None else f" ({self.name} autocast)"
