"""The files of a run folder: their names, atomic writes, JSON and JSON-lines reading.
Torch-free, so that the results tools (results.py, report.py, plots.py) never load the model."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable

from engine.errors import ConfigError, UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "best.pt"
LAST_FILE = "last.pt"  # the state to resume from; removed once the run is complete
PREDICTIONS_DIR = "predictions"
DIVERGED_FILE = "diverged.json"
# What a run writes after its config: any of them means the folder already holds a run.
RUN_OUTPUTS = (METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE, LAST_FILE, PREDICTIONS_DIR)
TEMP_PREFIX = ".tmp-"

# Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def file_mode(mode: int = 0o666) -> int:
    """Permissions a shared result gets under the user's umask."""
    return mode & ~_UMASK


class ResultsError(UserError):
    """A run folder's file that cannot be read (corrupt, not what a run writes)."""


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it
    over `path`: a crash never leaves a half-written result or checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder, os.path.basename(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temps(folder: str, name: str) -> None:
    """A process killed mid-write (kill -9) leaves its temporary file: the next write of
    the same file removes it, so no debris outlives a save."""
    for entry in os.listdir(folder):
        if entry.startswith(TEMP_PREFIX) and entry.endswith(name):
            try:
                os.unlink(os.path.join(folder, entry))
            except FileNotFoundError:
                pass


def finite(obj: Any) -> Any:
    """Non-finite floats become null: strict JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj: Any, **kwargs) -> str:
    return json.dumps(finite(obj), sort_keys=True, allow_nan=False, **kwargs)


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(to_json(obj, indent=2)))


def append_jsonl(path: str, obj: Any) -> None:
    """Append one line; the previous lines are rewritten with it, atomically (per-epoch
    records are few: a reader never sees half a line)."""
    previous = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    atomic_write(path, lambda f: f.write(previous + to_json(obj) + "\n"))


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: not valid JSON ({err})") from None


def read_jsonl(path: str) -> list[dict]:
    """Every line a JSON object. Writes are atomic, so a line that does not parse is
    corruption, never a record half-written: an error naming the file and line."""
    records = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ResultsError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ResultsError(f"{path}, line {number}: expected a JSON object")
            records.append(record)
    return records


def holds_run(folder: str) -> list[str]:
    """The run outputs already in `folder`."""
    return [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(folder, name))]


def start_run_dir(run_dir: str, config: dict) -> None:
    """Create the run folder and write config.json into it. A folder that already holds a
    run's results is refused: its metrics would mix two runs and its files be overwritten."""
    found = holds_run(run_dir)
    if LAST_FILE in found and SUMMARY_FILE not in found:
        raise ConfigError(f"--run_dir {run_dir} holds an interrupted run; continue it with "
                          f"--resume {run_dir}, or choose another folder")
    if found:
        raise ConfigError(f"--run_dir {run_dir} already holds a run ({', '.join(found)}); "
                          "choose another folder or remove it")
    made = not os.path.exists(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, CONFIG_FILE), config)
    except OSError as err:  # a read-only parent, a file in the way, a full disk
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        where = f": {err.filename}" if err.filename else ""
        raise ConfigError(f"--run_dir {run_dir}: cannot create the folder "
                          f"({err.strerror}{where})") from None
