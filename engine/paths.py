"""What a path option must name, checked in one place before anything is read or written:
a file (--config, --aux, --input), a trained model (--load: a run's best.pt, not the run
folder nor its resume state) or a run folder (--resume). A path of the wrong kind is a
ConfigError naming the flag and, where there is one, the path that was meant.
Torch-free, so that every script can check its paths before it loads the model."""
from __future__ import annotations

import os

from engine.errors import ConfigError
from engine.runfiles import CHECKPOINT_FILE, CONFIG_FILE, LAST_FILE


def check_kind(flag: str, path: str, kind: str) -> None:
    """Refuse `path` if it is not of `kind` ("file", "model" or "run"). A path that does
    not exist passes: its reader says so, in its own words."""
    if path and os.path.exists(path):
        {"file": _file, "model": _model, "run": _run}[kind](flag, path)


def _file(flag: str, path: str) -> None:
    if os.path.isdir(path):
        meant = os.path.join(path, CONFIG_FILE)
        hint = f"; did you mean {meant}?" if flag == "--config" and os.path.isfile(meant) else ""
        raise ConfigError(f"{flag} {path}: a folder, not a file{hint}")


def _model(flag: str, path: str) -> None:
    if os.path.isdir(path):
        best = os.path.join(path, CHECKPOINT_FILE)
        if os.path.isfile(best):
            raise ConfigError(f"{flag} {path}: a run folder; load its trained model with "
                              f"{flag} {best}")
        raise ConfigError(f"{flag} {path}: a folder, not a trained model (a run's "
                          f"{CHECKPOINT_FILE})")
    if os.path.basename(path) == LAST_FILE:
        raise ConfigError(resume_state(path, flag))


def _run(flag: str, path: str) -> None:
    if not os.path.isdir(path):
        folder = os.path.dirname(path) or "."
        if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            raise ConfigError(f"{flag} {path}: a file of the run folder {folder}; continue "
                              f"the run with {flag} {folder}")
        raise ConfigError(f"{flag} {path}: a file, not a run folder")


def is_resume_state(saved) -> bool:
    """What a loaded last.pt holds (trainer_state.save_state), whatever its file name."""
    return isinstance(saved, dict) and {"optimizers", "progress"} <= saved.keys()


def resume_state(path: str, flag: str = "") -> str:
    """The message for a run's resume state (last.pt) given where a trained model is wanted."""
    folder = os.path.dirname(path) or "."
    return (f"{f'{flag} ' if flag else ''}{path}: a resume state, not a trained model: use "
            f"{os.path.join(folder, CHECKPOINT_FILE)}, or --resume {folder} to continue the run")
