"""Ensembles: several trained checkpoints predict as one. Each member predicts through its
own model and tasks (its encoder, pair encodings, tokenizer and max_length); per task their
outputs are averaged (tasks.average: the mean probability, or the mean score) and the
prediction is made from the mean. Only outputs meet, so members may differ in anything but
their tasks and what their heads' outputs mean."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.errors import CheckpointError
from engine.runfiles import ENSEMBLE_FILE, write_json
from engine.tasks import KINDS, Task, average
from evaluation import Predictions, dev_scores, outputs, overall


@dataclass
class Member:
    path: str  # the best.pt it was loaded from (named in messages and records)
    model: torch.nn.Module
    tasks: dict[str, Task]  # its evaluated tasks by name


def meaning(task: Task) -> tuple:
    """What a head's output (after tasks.Task.output) means: its kind, size and labels."""
    return task.spec.kind, task.spec.num_outputs, task.spec.label_names


def check_agree(members: list[Member]) -> None:
    """The members' tasks, and what each head outputs, must be the same: else refused,
    naming the first member and the one that differs."""
    first = members[0]
    for other in members[1:]:
        if list(first.tasks) != list(other.tasks):
            raise CheckpointError(
                f"{first.path} and {other.path} do not agree on their tasks ("
                f"{', '.join(first.tasks) or 'none'} against {', '.join(other.tasks) or 'none'}): "
                "an ensemble averages the outputs of the same tasks")
        for name, task in first.tasks.items():
            if meaning(task) != meaning(other.tasks[name]):
                raise CheckpointError(f"{first.path} and {other.path}: their {name} heads' "
                                      f"outputs mean different things ({meaning(task)} against "
                                      f"{meaning(other.tasks[name])})")


def averaged(members: list[Member], name: str, split: str,
             device: torch.device) -> tuple[list, torch.Tensor, list]:
    """One task's ids, averaged outputs and labels on a split, in file order."""
    found = [outputs(m.model, m.tasks[name], split, device) for m in members]
    ids, _, labels = found[0]
    for member, (other, _, _) in zip(members[1:], found[1:]):
        if other != ids:
            raise CheckpointError(f"{members[0].path} and {member.path}: their {name} {split} "
                                  "data differ")
    return ids, average(members[0].tasks[name].spec.kind, [f[1] for f in found]), labels


def predict(members: list[Member], splits: tuple, device: torch.device) -> list[Predictions]:
    """Every task's predictions on every asked split it has data for, from the mean."""
    found = []
    for name, task in members[0].tasks.items():
        for split in (s for s in splits if task.examples(s)):
            ids, output, labels = averaged(members, name, split, device)
            values = KINDS[task.spec.kind].predict(output).tolist()
            found.append(Predictions(task, split, ids, values, labels))
    return found


def evaluate(members: list[Member], run_dir: str,
             device: torch.device) -> tuple[list[Predictions], dict]:
    """--eval_only of several checkpoints: their ensemble's predictions on dev and test in
    `run_dir` (the files a single checkpoint's evaluation writes) and ensemble.json, which
    names the members beside the dev scores. Returns the predictions and dev scores."""
    check_agree(members)
    predictions = predict(members, ("dev", "test"), device)
    for p in predictions:
        p.write(run_dir)
    scores = dev_scores(predictions)
    write_json(os.path.join(run_dir, ENSEMBLE_FILE),
               {"members": [os.path.abspath(m.path) for m in members], "dev": scores,
                "overall": overall(scores) if scores else None})
    return predictions, scores
