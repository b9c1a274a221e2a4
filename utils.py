"""Runtime helpers of the run path: seeding, device choice, checkpoints (precision:
engine/precision.py)."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from engine.errors import CheckpointError
from engine.paths import is_resume_state, resume_state
from engine.runfiles import atomic_write

LOG = logging.getLogger("minbert")


def save_checkpoint(path: str, payload: dict) -> None:
    """Plain tensors, dicts, lists and numbers only, so `weights_only=True` can load it."""
    atomic_write(path, lambda f: torch.save(payload, f), mode="wb")


def load_checkpoint(path: str, required: tuple[str, ...] = (), mmap: bool = False) -> dict:
    """A checkpoint written by save_checkpoint; a missing, truncated or foreign file, or
    one without the `required` keys, is a CheckpointError naming it. mmap: tensors are read
    only when touched (a look at a checkpoint's small records costs no weights)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle, zip and torch errors alike: the file is unusable
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not written "
                              f"by this tool? {type(err).__name__})") from None
    missing = [key for key in required if not isinstance(saved, dict) or key not in saved]
    if missing and is_resume_state(saved):  # a run's last.pt, under any name
        raise CheckpointError(resume_state(path))
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this tool (no {', '.join(missing)})")
    return saved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(use_gpu: bool) -> torch.device:
    if use_gpu and not torch.cuda.is_available():
        LOG.warning("--use_gpu: no CUDA device found, running on the CPU")
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
