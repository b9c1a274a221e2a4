"""Script helpers: atomic writes, seeding, device choice, checkpoints."""
from __future__ import annotations

import json
import logging
import os
import sys
import random
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from config import ConfigError

# Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it
    over `path`: a crash never leaves a half-written result or checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True))


# The files of a run folder, named once for the trainer that writes them and the readers.
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "best.pt"
PREDICTIONS_DIR = "predictions"
# What a run writes after its config: any of them means the folder already holds a run.
RUN_OUTPUTS = (METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE, PREDICTIONS_DIR)


def start_run_dir(run_dir: str, config: dict) -> None:
    """Create the run folder and write config.json into it. A folder that already holds a
    run's results is refused: its metrics would mix two runs and its files be overwritten."""
    found = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(run_dir, name))]
    if found:
        raise ConfigError(f"--run_dir {run_dir} already holds a run ({', '.join(found)}); "
                          "choose another folder or remove it")
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, CONFIG_FILE), config)


def append_jsonl(path: str, obj: Any) -> None:
    """Append one line; the previous lines are rewritten with it, atomically."""
    previous = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    atomic_write(path, lambda f: f.write(previous + json.dumps(obj, sort_keys=True) + "\n"))


def save_checkpoint(path: str, payload: dict) -> None:
    """Plain tensors, dicts, lists and numbers only, so `weights_only=True` can load it."""
    atomic_write(path, lambda f: torch.save(payload, f), mode="wb")


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bfloat16 natively: emulated bf16 on a CPU without
    AVX512-BF16 or AMX is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    """--precision: fp32, bf16 (autocast), or auto (bf16 where the hardware has it)."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def run_cli(main: Callable[[], Any]) -> int:
    """A script's entry point: bad input (a data file, a checkpoint, an option) becomes
    one clear message on stderr and exit code 2, not a traceback."""
    from base_bert import CheckpointError
    from datasets import DataError
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    try:
        main()
    except (DataError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
