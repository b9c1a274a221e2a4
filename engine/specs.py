"""The task list, in one place: where each task's data lives, how its labels parse, what
it predicts and how it is scored. Torch-free: the results tools read it too."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelSpec:
    """How a label column is parsed and checked."""
    column: str
    low: float
    high: float
    integer: bool  # class ids (int64) rather than scores (float32)

    def parse(self, raw: str) -> float | int:
        value = float(raw)
        if value != value:  # NaN passes no range check below
            raise ValueError(f"{raw!r} is not a number")
        if not math.isfinite(value):  # int() of an infinity raises OverflowError
            raise ValueError(f"{raw!r} is not a finite number")
        if self.integer:
            if value != int(value):
                raise ValueError(f"{raw!r} is not a whole number")
            value = int(value)
        if not self.low <= value <= self.high:
            raise ValueError(f"{raw!r} is outside {self.low:g}..{self.high:g}")
        return value


SENTIMENT_5 = LabelSpec("sentiment", 0, 4, integer=True)  # SST-5, Yelp stars - 1
SENTIMENT_2 = LabelSpec("sentiment", 0, 1, integer=True)  # CFIMDB
PARAPHRASE = LabelSpec("is_duplicate", 0, 1, integer=True)  # Quora
SIMILARITY = LabelSpec("similarity", 0.0, 5.0, integer=False)  # STS-B

# kind -> the metric it is scored by (tasks.KINDS holds each kind's loss and prediction)
KIND_METRICS = {"classification": "accuracy", "binary": "accuracy", "regression": "pearson"}
METRIC_SHORT = {"accuracy": "acc", "pearson": "corr"}


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and what it predicts."""
    name: str
    display: str  # for tables: "SST", "Quora"
    files: str  # a pattern with {split}: train, dev, test-student
    pair: bool
    label: LabelSpec
    kind: str  # a key of KIND_METRICS
    num_outputs: int
    prediction_label: str  # the column name of the prediction files
    multitask: bool = False  # one of multitask_classifier.py's evaluated tasks
    evaluated: bool = True  # False: trained only (the auxiliary task)
    label_names: tuple[str, ...] = ()  # what each class id means (classification, binary)

    @property
    def metric(self) -> str:
        return KIND_METRICS[self.kind]

    @property
    def label_text(self) -> str:
        """Column label of results tables, e.g. 'SST acc'."""
        return f"{self.display} {METRIC_SHORT[self.metric]}"


SPECS = {spec.name: spec for spec in (
    TaskSpec("sst", "SST", "ids-sst-{split}.csv", False, SENTIMENT_5, "classification", 5,
             "Sentiment", multitask=True, label_names=(
                 "negative", "somewhat negative", "neutral", "somewhat positive", "positive")),
    TaskSpec("quora", "Quora", "quora-{split}.csv", True, PARAPHRASE, "binary", 1,
             "Is_Paraphrase", multitask=True, label_names=("not paraphrase", "paraphrase")),
    TaskSpec("sts", "STS", "sts-{split}.csv", True, SIMILARITY, "regression", 1,
             "Similarity", multitask=True),
    TaskSpec("cfimdb", "CFIMDB", "ids-cfimdb-{split}.csv", False, SENTIMENT_2,
             "classification", 2, "Sentiment", label_names=("negative", "positive")),
)}
# The multitask script's tasks, in their canonical order (metrics, tables, file names).
TASK_NAMES = tuple(name for name, spec in SPECS.items() if spec.multitask)
CLASSIFIER_TASKS = tuple(name for name, spec in SPECS.items() if not spec.pair)
# The report's auxiliary Yelp task: 5-star sentiment, trained, never evaluated.
AUX = TaskSpec("aux", "Aux", "", False, SENTIMENT_5, "classification", 5, "Sentiment",
               evaluated=False, label_names=("1 star", "2 stars", "3 stars", "4 stars", "5 stars"))


def canonical_tasks(names) -> tuple[str, ...]:
    """A task subset in TASK_NAMES order: the order a user typed never matters."""
    return tuple(name for name in TASK_NAMES if name in set(names))
