"""Metrics, prediction over a loader, and the prediction files."""
from __future__ import annotations

import csv
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score

from utils import atomic_write


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    return float(accuracy_score(np.asarray(labels), np.asarray(predictions)))


def pearson(predictions: Sequence, labels: Sequence) -> float:
    """Pearson correlation; 0.0 when either side is constant (it is undefined there)."""
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


METRICS = {"accuracy": accuracy, "pearson": pearson}


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


@torch.inference_mode()
def predict(model: torch.nn.Module, task, loader, device: torch.device) -> tuple[list, list, list]:
    """(ids, predictions, labels) of one task over an (unshuffled) loader; labels are
    empty for unlabeled files. The model is left in eval mode."""
    model.eval()
    ids, predictions, labels = [], [], []
    for batch in loader:
        batch = batch.to(device)
        output = model(task.name, batch)
        ids += batch.ids
        predictions += task.predict(output).cpu().tolist()
        if batch.labels is not None:
            labels += batch.labels.cpu().tolist()
    return ids, predictions, labels
