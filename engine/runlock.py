"""One process per run folder: a run (or a resume, an evaluation) makes its folder
exclusively and holds its lock (flock on RUN/.lock, which names the holder) for its whole
life, so that two runs never mix their files. Torch-free; under torchrun only rank 0 claims.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from engine.errors import ConfigError
from engine.runfiles import LAST_FILE, LOCK_FILE, SUMMARY_FILE, file_mode, start_run_dir


def claim_training_dir(resume: str, run_dir: str, default: str, config: dict,
                       reads: Iterable[str]):
    """A training run's folder, claimed for its whole life (claim_run_dir): --resume's, else
    a new one (--run_dir or the time-stamped `default`) with its config.json written."""
    if resume:
        return claim_run_dir("--resume", resume, "", start=_still_resumable)
    return claim_run_dir("--run_dir", run_dir, default,
                         start=lambda folder: start_run_dir(folder, config, reads))


def _still_resumable(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, LAST_FILE)):  # checked before, unlocked
        raise ConfigError(f"--resume {folder}: no {LAST_FILE} any more (another process has "
                          "finished the run)")


@contextmanager
def claim_run_dir(flag: str, folder: str, default: str,
                  start: Callable[[str], None] = lambda _: None) -> Iterator[str]:
    """The folder of a run (or an evaluation), locked for the block's whole life: `folder`
    (made if missing), else `default`, or `default`-2, -3, ... when it exists (os.mkdir
    fails on an existing folder: two runs started in one second never share one).
    `start(folder)` runs under the lock: a second process cannot pass its checks meanwhile."""
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{flag} {folder}: exists and is not a folder")
    try:
        if folder:
            os.makedirs(folder, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(default)), exist_ok=True)
            folder = next(path for path in itertools.chain(
                [default], (f"{default}-{n}" for n in itertools.count(2))) if _made(path))
    except OSError as err:  # a read-only parent, a file in the way, a full disk
        where = f": {err.filename}" if err.filename else ""
        raise ConfigError(f"{flag} {folder or default}: cannot create the folder "
                          f"({err.strerror}{where})") from None
    with run_lock(folder, flag):
        start(folder)
        yield folder


def _made(path: str) -> bool:
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False


@contextmanager
def run_lock(folder: str, flag: str) -> Iterator[None]:
    """Hold `folder`'s lock (flock on folder/.lock) while the block runs; a process that
    finds it held is refused, naming the holder. The OS drops a flock when its process
    dies, even by kill -9: a lock is never stale. The file goes with the lock."""
    path = os.path.join(folder, LOCK_FILE)
    fd = _lock(path, flag, folder)
    try:
        yield
    finally:
        try:  # unlinked before it is unlocked: a process that opened it meanwhile retries
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock(path: str, flag: str, folder: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as err:
            raise ConfigError(f"{flag} {folder}: cannot create {LOCK_FILE} in it "
                              f"({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                break  # a file system without locks (some network ones): run unlocked
            os.close(fd)
            raise ConfigError(f"{flag} {folder} is in use by {lock_holder(path)}; wait for "
                              "it to end or choose another folder") from None
        if _still_there(path, fd):
            break
        os.close(fd)  # its holder removed it on release: lock the file there now
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _still_there(path: str, fd: int) -> bool:
    try:
        here, ours = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)


def lock_holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it has just taken the lock and not yet said who it is


def remove_run_dir(flag: str, folder: str) -> None:
    """Remove a run folder that stopped before its first save; refused, naming it, if a
    process is using it or it has since saved something to keep (last.pt, summary.json)."""
    with run_lock(folder, flag):
        kept = [name for name in (LAST_FILE, SUMMARY_FILE)
                if os.path.exists(os.path.join(folder, name))]
        if kept:
            raise ConfigError(f"{flag}: {folder} now holds {', '.join(kept)} (another process "
                              "ran it meanwhile); it is not removed")
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if entry == LOCK_FILE:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    try:
        os.rmdir(folder)
    except OSError:  # a run claimed it meanwhile: it is that run's now
        pass
