"""Runs a training script, but sends itself a signal right after the Nth save of last.pt
(KILL_AFTER_SAVES=N, KILL_SIGNAL=KILL|TERM|INT): an interruption at an exact point."""
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine import trainer  # noqa: E402

SAVES = int(os.environ["KILL_AFTER_SAVES"])
SIGNAL = getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL"))
original = trainer.save_state
count = 0


def save_then_signal(*args, **kwargs):
    global count
    original(*args, **kwargs)
    count += 1
    if count == SAVES:
        os.kill(os.getpid(), SIGNAL)


trainer.save_state = save_then_signal

if __name__ == "__main__":
    import classifier
    import multitask_classifier
    script = {"multitask": multitask_classifier, "classifier": classifier}[sys.argv[1]]
    sys.argv = [script.__file__] + sys.argv[2:]
    sys.exit(script.cli())
