"""The files of a run folder: their names, atomic writes, JSON and JSON-lines reading; the
one reader of text files (data files, predict.py's input); and the check that keeps every
command's output off what it did not make (check_output). Torch-free, so that the results
tools (results.py, report.py, plots.py) never load the model."""
from __future__ import annotations

import codecs
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterable

from engine.errors import ConfigError, DataError, OutputError, UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "best.pt"
LAST_FILE = "last.pt"  # the state to resume from; removed once the run is complete
PREDICTIONS_DIR = "predictions"
DIVERGED_FILE = "diverged.json"
ENSEMBLE_FILE = "ensemble.json"  # --eval_only of several checkpoints: members, dev scores
STEPS_FILE = "steps.jsonl"  # steplog.py's live log
TENSORBOARD_DIR = "tensorboard"
# What a run that stopped before its first save leaves beside its config.json: a new start
# in its folder removes them, so that they hold the new run's records alone.
STALE_LOGS = (STEPS_FILE, TENSORBOARD_DIR, DIVERGED_FILE)
LOCK_FILE = ".lock"  # locked (flock) by the one process writing the folder; says which
# What a run writes after its config: any of them means the folder already holds a run.
RUN_OUTPUTS = (METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE, LAST_FILE, PREDICTIONS_DIR)
# Every file a run writes in its folder (and PREDICTIONS_DIR's contents).
RUN_FILES = RUN_OUTPUTS + (CONFIG_FILE, DIVERGED_FILE, STEPS_FILE, LOCK_FILE)
TEMP_PREFIX = ".tmp-"
STDIN = "<stdin>"  # how messages name standard input

# Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def file_mode(mode: int = 0o666) -> int:
    """Permissions a shared result gets under the user's umask."""
    return mode & ~_UMASK


class ResultsError(UserError):
    """A run folder's file that cannot be read (corrupt, not what a run writes)."""


def read_lines(path: str | None) -> list[str]:
    """The lines of a UTF-8 text file, or of standard input when `path` is None. A BOM at
    the start is dropped; lines end at \\n or \\r\\n only, not at the other breaks
    str.splitlines knows (a form feed or U+2028 inside a sentence is text). A missing file,
    a folder or bytes that are not UTF-8 raise DataError naming the file (and line)."""
    name = STDIN if path is None else path
    data = read_bytes(path).removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{name}, line {line}: not UTF-8 text ({err.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the last line's end, not an empty line after it
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_bytes(path: str | None) -> bytes:
    if path is None:
        # bytes, so that one decoder (and its errors) serves files and standard input alike;
        # a text stand-in without a buffer (io.StringIO) is already decoded
        stream = getattr(sys.stdin, "buffer", None)
        return stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None


def check_output_file(path: str) -> None:
    """Refuse an output path that names a folder: renaming a file over it would fail."""
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a folder, not a file")


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(file)` into a temporary file beside `path`, then rename it
    over `path`: a crash never leaves a half-written result or checkpoint."""
    check_output_file(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(folder, os.path.basename(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
    except OSError as err:
        raise OutputError(f"{path}: cannot be written ({err.strerror})") from None
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


def start_run_dir(run_dir: str, config: dict, reads: Iterable[str] = ()) -> None:
    """Write config.json into a new run's folder, once check_output has passed it. A folder
    whose run stopped before its first save is started afresh (its logs removed)."""
    check_output("--run_dir", run_dir, reads)
    remove_stale_logs(run_dir)
    try:
        write_json(os.path.join(run_dir, CONFIG_FILE), config)
    except OSError as err:  # a read-only folder, a full disk
        raise ConfigError(f"--run_dir {run_dir}: cannot write {CONFIG_FILE} "
                          f"({err.strerror})") from None


def remove_stale_logs(run_dir: str) -> None:
    """The logs of an earlier start in `run_dir` that stopped before its first save (a
    folder with a saved state or a result is refused before this)."""
    for name in STALE_LOGS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# --- outputs ------------------------------------------------------------------------------

def check_output(flag: str, path: str, reads: Iterable[str] = (),
                 replace: Callable[[str], bool] | None = None, file: bool = False) -> None:
    """Refuse, naming `flag` and `path`, an output that would overwrite or delete what the
    command did not make: anything it `reads` (or, for a folder, a folder holding one), a
    run folder, or (a `file` output) a run's own file. With `replace` (the folder is deleted,
    then written anew): a non-empty folder only if `replace` recognises it as the command's
    earlier output, and never one holding a run folder."""
    real = os.path.realpath(path)
    if not file:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: exists and is not a folder")
        refuse_run_folder(flag, path)
    for read in filter(None, reads):
        if os.path.realpath(read) == real or _same_file(read, path):
            raise ConfigError(f"{flag} {path} is {read}, which this command reads; choose "
                              f"another {'file' if file else 'folder'}")
        if not file and _inside(os.path.realpath(read), real):
            raise ConfigError(f"{flag} {path} holds {read}, which this command reads; "
                              "choose another folder")
    if file:
        owner = "" if os.path.isdir(path) else _run_of(real)
        if os.path.isdir(path) or owner:
            what = f"a file of the run in {owner}" if owner else "a folder"
            raise ConfigError(f"{flag} {path} is {what}; choose another file")
        return
    if replace is None or not os.path.isdir(path) or not os.listdir(path):
        return
    if not replace(path):
        raise ConfigError(f"{flag} {path}: not empty, and not an earlier output of this "
                          "command (only those are replaced); choose another folder")
    runs = runs_below(path)
    if runs:
        raise ConfigError(f"{flag} {path} holds the run folder {runs[0]}"
                          f"{f' (and {len(runs) - 1} more)' if len(runs) > 1 else ''}; "
                          "it is not replaced: move the runs out or choose another folder")


def refuse_run_folder(flag: str, path: str) -> None:
    found = holds_run(path)
    if LAST_FILE in found and SUMMARY_FILE not in found:
        raise ConfigError(f"{flag} {path} holds an interrupted run; continue it with "
                          f"--resume {path}, or choose another folder")
    if found:
        what = "a run or an evaluation" if found == [PREDICTIONS_DIR] else "a run"
        raise ConfigError(f"{flag} {path} already holds {what} ({', '.join(found)}); "
                          "choose another folder or remove it")


def runs_below(folder: str) -> list[str]:
    """The run folders inside `folder` (not itself)."""
    found = []
    for here, subfolders, _ in os.walk(folder):
        if here != folder and holds_run(here):
            found.append(here)
            subfolders.clear()
    return sorted(found)


def _run_of(path: str) -> str:
    """The run folder that `path` is one of the files of, else ''."""
    folder, name = os.path.split(path)
    if os.path.basename(folder) == PREDICTIONS_DIR:
        folder, name = os.path.dirname(folder), PREDICTIONS_DIR
    return folder if name in RUN_FILES and holds_run(folder) else ""


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _same_file(a: str, b: str) -> bool:
    """Also through hard links."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
