"""Runs a training script, but sends itself a signal right after the Nth save of last.pt:
an interruption at an exact point. Two ways in:
- as a program (KILL_AFTER_SAVES=N, KILL_SIGNAL=KILL|TERM|INT): torchrun starts it so;
- `run_killed`, the target of a process forked from a multiprocessing forkserver that has
  imported torch and the scripts once: tests/test_resume.py's `killed`. A
  killed run then costs its run only, not an interpreter's start and torch's import (~2 s
  of the ~3-6 s each; the suite kills two dozen). The server never computes, so its
  children start with OpenMP untouched (GNU OpenMP is not fork-safe once used)."""
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import classifier  # noqa: E402
import multitask_classifier  # noqa: E402
from engine import trainer  # noqa: E402

SCRIPTS = {"multitask": multitask_classifier, "classifier": classifier}


def signal_after_saves(saves: int, name: str) -> None:
    original, count = trainer.save_state, 0

    def save_then_signal(*args, **kwargs):
        nonlocal count
        original(*args, **kwargs)
        count += 1
        if count == saves:
            os.kill(os.getpid(), getattr(signal, "SIG" + name))

    trainer.save_state = save_then_signal


def run_script(script: str, argv: list[str]) -> int:
    module = SCRIPTS[script]
    sys.argv = [module.__file__, *argv]
    return module.cli()


def run_killed(script: str, argv: list[str], saves: int, name: str, env: dict,
               out: str, err: str) -> None:
    """A forked child's whole life, as the program's would be: the caller's environment
    (not the server's, which is older), the checkout as working directory, stdout and
    stderr into files, one thread (as the test process: another count sums in another
    order); its exit code is the script's, or minus the signal's number."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    for fd, path in ((1, out), (2, err)):
        with open(path, "w") as f:
            os.dup2(f.fileno(), fd)
    torch.set_num_threads(1)
    signal_after_saves(saves, name)
    sys.exit(run_script(script, argv))


if __name__ == "__main__":
    signal_after_saves(int(os.environ["KILL_AFTER_SAVES"]), os.environ.get("KILL_SIGNAL", "KILL"))
    sys.exit(run_script(sys.argv[1], sys.argv[2:]))
