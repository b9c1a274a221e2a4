"""Metrics, prediction, and the prediction files: the one evaluation path that the
per-epoch evaluation, the end of training and --eval_only all use."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from datasets import make_loader
from engine.distributed import gather_objects
from engine.runfiles import PREDICTIONS_DIR, atomic_write


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    # numpy, not sklearn.metrics.accuracy_score (tests/test_evaluation.py checks they agree):
    # importing sklearn.metrics (scipy with it) took 1.4 s of every command's 3.2 s start.
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or not len(labels):
        raise ValueError(f"accuracy of {predictions.shape} predictions against {labels.shape} labels")
    return float(np.mean(predictions == labels))


def pearson(predictions: Sequence, labels: Sequence) -> float:
    """Pearson correlation; 0.0 when either side is constant (it is undefined there)."""
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


METRICS = {"accuracy": accuracy, "pearson": pearson}


@dataclass
class Predictions:
    """One task's predictions on one split, in file order; labels empty when unlabeled."""
    task: object  # tasks.Task
    split: str
    ids: list
    values: list
    labels: list

    def score(self) -> float:
        return self.task.metric(self.values, self.labels)

    def path(self, run_dir: str) -> str:
        return os.path.join(run_dir, PREDICTIONS_DIR, f"{self.task.name}-{self.split}-output.csv")

    def write(self, run_dir: str) -> str:
        path = self.path(run_dir)
        write_predictions(path, self.ids, self.values, self.task.spec.prediction_label)
        return path


# An evaluation batch takes EVAL_BATCH_SIZE examples of similar length (or its training
# batch size, if larger) and grows on while its padding stays under EVAL_PADDING of its
# padded tokens, up to EVAL_TOKENS padded tokens (sequences x longest length). A large dev
# set has many sentences of each length: there batches reach the token budget, so there
# are fewer of them (less per-batch work: collation, kernel launches on a GPU); a small
# one has few, and a larger batch would mostly add padding, which a CPU pays for in full.
EVAL_BATCH_SIZE = 64
EVAL_TOKENS = 8192
EVAL_PADDING = 0.05


def eval_batches(task, examples) -> list[list[int]]:
    """Example indices sorted by length (ties in file order), cut into batches as above:
    padding every sentence to its batch's longest costs a CPU most of an evaluation pass
    when short and long ones share a batch. No randomness: every process of a distributed
    evaluation cuts the same batches."""
    lengths = task.collate.lengths(examples)
    inputs = task.collate.inputs_per_example(examples) if examples else 1
    least = max(task.batch_size, EVAL_BATCH_SIZE)
    batches, batch, tokens = [], [], 0
    for i in sorted(range(len(examples)), key=lengths.__getitem__):
        size, longest = len(batch) + 1, lengths[i]  # sorted: i is the batch's longest
        padded = size * longest
        if batch and (padded * inputs > EVAL_TOKENS or size > least
                      and padded - (tokens + longest) > EVAL_PADDING * padded):
            batches.append(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += longest
    return batches + [batch] if batch else batches


@torch.inference_mode()
def predict(model: torch.nn.Module, task, split: str, device: torch.device,
            dist=None) -> Predictions:
    """A task's predictions on one of its splits, in file order (computed in batches of
    similar length). With `dist` (distributed.Dist, several processes) each process
    predicts every world_size-th batch and all of them get the whole split, each example
    once. The model is left in eval mode."""
    model.eval()
    examples = task.examples(split)
    batches = eval_batches(task, examples)
    if dist is not None and dist.enabled:
        batches = batches[dist.rank::dist.world_size]
    rows = []  # (index in the file, id, value, label)
    for indices, batch, output in evaluated(model, task, examples, batches, device):
        predicted = task.predict(output).cpu().tolist()
        gold = batch.labels.cpu().tolist() if batch.labels is not None else [None] * len(indices)
        rows += zip(indices, batch.ids, predicted, gold)
    if dist is not None and dist.enabled:
        rows = [row for part in gather_objects(rows) for row in part]
    rows.sort(key=lambda row: row[0])
    return Predictions(task, split, [r[1] for r in rows], [r[2] for r in rows],
                       [r[3] for r in rows if r[3] is not None])


def evaluated(model, task, examples, batches, device):
    """(example indices, batch on `device`, the model's raw output) per batch of indices."""
    loader = make_loader(examples, task.collate, 1, shuffle=False, batches=batches)
    for indices, batch in zip(batches, loader):
        batch = batch.to(device)
        yield indices, batch, model(task.name, batch)


@torch.inference_mode()
def outputs(model: torch.nn.Module, task, split: str, device: torch.device
            ) -> tuple[list, torch.Tensor, list]:
    """A task's ids, outputs (one row per example, as tasks.Task.output gives them: what
    an ensemble averages) and labels on one of its splits, in file order; one process."""
    model.eval()
    examples = task.examples(split)
    rows = [None] * len(examples)  # (id, output, label)
    for indices, batch, output in evaluated(model, task, examples, eval_batches(task, examples),
                                            device):
        gold = batch.labels.cpu().tolist() if batch.labels is not None else [None] * len(indices)
        for i, example_id, row, label in zip(indices, batch.ids, task.output(output).cpu(), gold):
            rows[i] = (example_id, row, label)
    return ([r[0] for r in rows], torch.stack([r[1] for r in rows]),
            [r[2] for r in rows if r[2] is not None])


def predict_all(model, tasks, device, splits: Sequence[str], dist=None) -> list[Predictions]:
    """Every evaluated task on every asked split it has data for."""
    return [predict(model, task, split, device, dist) for task in tasks if task.spec.evaluated
            for split in splits if task.examples(split)]


def dev_scores(predictions: list[Predictions]) -> dict[str, float]:
    return {p.task.name: p.score() for p in predictions if p.split == "dev"}


def overall(scores: dict[str, float]) -> float:
    """The mean of the trained tasks' dev metrics."""
    return sum(scores.values()) / len(scores)


def format_results(scores: dict[str, float], tasks, title: str) -> str:
    """The dev table printed at the end of training and by --eval_only."""
    metric = {t.name: t.metric_name for t in tasks}
    lines = [title, f"  {'task':<8}{'metric':<10}{'value':>7}"]
    lines += [f"  {name:<8}{metric[name]:<10}{value:>7.3f}" for name, value in scores.items()]
    if len(scores) > 1:
        lines.append(f"  {'overall':<8}{'mean':<10}{overall(scores):>7.3f}")
    return "\n".join(lines)


def write_predictions(path: str, ids: Sequence[str], predictions: Sequence,
                      label_name: str) -> None:
    """The starter's layout: a header `id,Predicted_<label>` then one row per example."""
    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", f"Predicted_{label_name}"])
        for example_id, prediction in zip(ids, predictions):
            writer.writerow([example_id, format_prediction(prediction)])
    atomic_write(path, write)


def format_prediction(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def read_predictions(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return {row[0]: row[1] for row in reader}
