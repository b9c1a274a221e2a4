"""What last.pt records of a run's inputs, so that --resume continues only the run that was
saved: its configuration (what config.json holds) and a digest of every training file it
read. Torch-free: the check runs before the model or the data is loaded."""
from __future__ import annotations

import hashlib
import json
import os

from engine.errors import ConfigError
from engine.runfiles import CONFIG_FILE

FINGERPRINT = "fingerprint"  # its key in last.pt (and best.pt)
CHUNK = 1 << 20


def file_digest(path: str) -> dict:
    """Size and sha256 of the bytes (~1 s per GB; at every start and resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def fingerprint(config: dict, train_files: dict[str, str]) -> dict:
    """`config`: the run's configuration (what its config.json holds); `train_files`: task ->
    the training file it read (each task's, and the auxiliary one)."""
    return {"config": dict(config),
            "train_files": {task: {"path": os.path.abspath(path), **file_digest(path)}
                            for task, path in train_files.items()}}


def _show(config: dict, key: str) -> str:
    return json.dumps(config[key]) if key in config else "(absent)"


def config_changes(recorded: dict, config: dict, ignored: tuple = ()) -> list[str]:
    """'key old -> new' for every setting of `config` that differs from `recorded`."""
    keys = sorted((set(recorded) | set(config)) - set(ignored))
    return [f"{key} {_show(recorded, key)} -> {_show(config, key)}" for key in keys
            if key not in recorded or key not in config or recorded[key] != config[key]]


def file_changes(recorded: dict) -> list[str]:
    """The recorded training files that are gone or whose bytes differ now."""
    changes = []
    for task, saved in sorted(recorded.items()):
        path = saved["path"]
        if not os.path.isfile(path):
            changes.append(f"the {task} training file {path} is missing")
            continue
        now = file_digest(path)
        if now != {"size": saved["size"], "sha256": saved["sha256"]}:
            size = (f"{saved['size']} -> {now['size']} bytes" if now["size"] != saved["size"]
                    else "same size, other bytes")
            changes.append(f"the {task} training file {path} changed ({size})")
    return changes


def check_unchanged(folder: str, recorded: dict | None, config: dict, ignored: tuple = ()) -> None:
    """--resume: refuse a run whose configuration (`config`: what it would run with now, read
    from its config.json) or training files differ from what its last save recorded; a
    last.pt from before the record passes."""
    if not recorded:
        return
    changes = file_changes(recorded.get("train_files", {}))
    differ = config_changes(recorded.get("config", {}), config, ignored)
    if differ:
        changes.insert(0, f"{CONFIG_FILE}: " + ", ".join(differ))
    if changes:
        raise ConfigError(f"--resume {folder}: changed since its last save: {'; '.join(changes)}. "
                          f"Restore them, or start a new run (--config {os.path.join(folder, CONFIG_FILE)})")
