"""grid.py's runs as jobs: the folder checks before a run (is_done, clear_unsaved) and
`--jobs N`, N trainer subprocesses at once, each with its own log, its share of the CPU
threads and, where several GPUs are visible, its own GPU (torch-free). What it has to say
goes through the `say` the script passes (grid.py: print)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from engine.errors import UserError
from engine.grid_rows import split_list
from engine.runfiles import SUMMARY_FILE
from engine.runlock import remove_run_dir

# --jobs N runs the trainer as subprocesses
TRAINER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "multitask_classifier.py")
POLL_SECONDS = 0.5


@dataclass
class Job:
    label: str
    run_dir: str
    argv: list
    log: str = ""


def is_done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, SUMMARY_FILE))


def clear_unsaved(job: Job, say: Callable[[str], None]) -> None:
    """A folder that stopped before its first save holds nothing to resume: rerun from
    scratch. One a process is using (a run in progress) is refused, not removed."""
    if job.argv[:1] != ["--resume"] and os.path.exists(job.run_dir):
        say(f"{job.label}: {job.run_dir} stopped before its first save, rerunning from scratch")
        remove_run_dir("--runs_dir", job.run_dir)


def trainer_command(argv: list[str]) -> list[str]:
    return [sys.executable, TRAINER, *argv]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_gpus(wanted: str = "") -> list[str]:
    """--gpus 0,1, else $CUDA_VISIBLE_DEVICES, else the GPUs `nvidia-smi -L` lists (torch-free)."""
    if wanted:
        return split_list(wanted)
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return split_list(env)
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if listed.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]


def job_env(slot: int, jobs: int, gpus: list[str]) -> dict[str, str]:
    """A run's environment: its own GPU when several are there (or --gpus names them), and
    its share of the CPU cores for the BLAS / OpenMP threads."""
    env = dict(os.environ)
    threads = str(max(1, cpu_count() // jobs))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if gpus:
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=gpus[slot % len(gpus)])
    return env


class RunsFailed(UserError):
    """Runs of a parallel grid that exited with an error (the report of the rest is written)."""


def run_parallel(todo: list[Job], jobs: int, gpus: list[str],
                 say: Callable[[str], None]) -> list[Job]:
    """--jobs N: N runs at once, each a subprocess of the trainer logging to its own file;
    returns the jobs that failed."""
    running: dict[int, tuple[Job, subprocess.Popen, object]] = {}  # slot -> job, process, log
    failed, queue = [], list(todo)
    where = (f"GPUs {','.join(gpus)}" if gpus else
             f"{max(1, cpu_count() // jobs)} CPU threads each")
    say(f"running {len(todo)} runs, {jobs} at once ({where}); logs in "
        f"{os.path.dirname(todo[0].log) if todo else '-'}")
    try:
        while queue or running:
            for slot in range(jobs):
                if slot not in running and queue:
                    job = queue.pop(0)
                    started = start(job, slot, jobs, gpus, say)
                    if started is None:
                        failed.append(job)
                    else:
                        running[slot] = started
            time.sleep(POLL_SECONDS)
            failed += collect(running, say)
    finally:  # interrupted (Ctrl-C): stop the runs this grid started; each saves its state
        for job, proc, log in running.values():
            proc.terminate()
        for job, proc, log in running.values():
            proc.wait()
            log.close()
    return failed


def start(job: Job, slot: int, jobs: int, gpus: list[str], say: Callable[[str], None]):
    """The job's trainer subprocess in `slot`: (job, process, log), or None when its
    folder is refused (a process is using it: it stays its own)."""
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    log = open(job.log, "a", encoding="utf-8")
    try:
        clear_unsaved(job, say)
    except UserError as err:
        log.write(f"{job.label}: FAILED ({err})\n")
        say(f"{job.label}: FAILED ({err})")
        log.close()
        return None
    env = job_env(slot, jobs, gpus)
    proc = subprocess.Popen(trainer_command(job.argv), stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    gpu = f", GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
    say(f"{job.label}: started -> {job.run_dir} (log {job.log}{gpu})")
    return job, proc, log


def collect(running: dict, say: Callable[[str], None]) -> list[Job]:
    """Removes the finished runs from `running`; returns those that failed (an exit code,
    or exit 0 without summary.json)."""
    failed = []
    for slot, (job, proc, log) in list(running.items()):
        code = proc.poll()
        if code is None:
            continue
        log.close()
        del running[slot]
        ok = code == 0 and is_done(job.run_dir)
        why = "" if ok or code else ", but no summary.json"
        say(f"{job.label}: {'finished' if ok else 'FAILED'} (exit {code}{why})")
        if not ok:
            failed.append(job)
    return failed
