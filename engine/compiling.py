"""--compile: torch.compile of the part of a training step that does the work, TaskLosses
(the encoder, packed or one pass per task, the heads and the losses, under the run's
autocast), compiled in place by nn.Module.compile. In place, so that nothing saved changes:
the model keeps its modules, and their state_dict keys (last.pt, best.pt) never gain the
`_orig_mod.` prefix that a torch.compile(module) wrapper would add.

dynamic=True: batch shapes change every step (length buckets, short last batches); a graph
per shape would recompile again and again. Under torchrun the inner module is compiled and
DistributedDataParallel wraps it, the order torch's guide recommends ("Where to apply
torch.compile?": compile the module passed to the DDP wrapper); Dynamo then splits the
graph at DDP's gradient buckets (its DDPOptimizer) so that the all-reduces still overlap
the backward pass.

The backend is inductor. The environment variable MINBERT_COMPILE_BACKEND names another
(`eager`: Dynamo's tracing, eager kernels; `aot_eager`: also AOTAutograd's traced
backward): the tests check the plumbing with them, without inductor's C++ compilation,
which takes minutes on a small shared CPU. Evaluation and prediction stay eager."""
from __future__ import annotations

import os

import torch
from torch import nn

from engine.errors import ConfigError

BACKEND_ENV = "MINBERT_COMPILE_BACKEND"
INDUCTOR = "inductor"


def compile_backend() -> str:
    """inductor, or the backend MINBERT_COMPILE_BACKEND names (testing)."""
    return os.environ.get(BACKEND_ENV, "") or INDUCTOR


def check_compile_mode(mode: str, device: torch.device) -> None:
    """reduce-overhead is inductor's CUDA graphs: on a CPU it would silently be the default
    mode, so it is refused there (max-autotune has CPU GEMM templates, and runs)."""
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"--compile_mode reduce-overhead records CUDA graphs; this run is on "
                          f"the {device.type} (--use_gpu and a CUDA device needed): use "
                          "--compile_mode default or max-autotune")


def compile_losses(losses: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Compile `losses` (TaskLosses) in place for `device` with inductor's `mode`; returns it."""
    check_compile_mode(mode, device)
    backend = compile_backend()
    # inductor's modes mean nothing to the testing backends (they would warn)
    options = {"mode": mode} if backend == INDUCTOR and mode != "default" else {}
    losses.compile(backend=backend, dynamic=True, **options)
    return losses


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place (nn.Module.compile, as compile_losses does)."""
    return getattr(module, "_compiled_call_impl", None) is not None
