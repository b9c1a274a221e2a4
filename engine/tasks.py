"""Tasks: each is a small object (name, data, head, loss, predict, metric), so that the
training loops never branch on a task's name. The task list itself is specs.SPECS."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from datasets import Collator, Example, read_pairs, read_sentences
from evaluation import METRICS
from engine.heads import TaskHead, make_head
from engine.specs import TaskSpec

SPLITS = ("train", "dev", "test")
FILE_SPLITS = {"train": "train", "dev": "dev", "test": "test-student"}


@dataclass(frozen=True)
class TaskKind:
    """How outputs of one kind of task are trained and turned into predictions; `detail`
    is what predict.py prints beside a prediction, `output` and `prediction` what heads.json
    says of them."""
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor], torch.Tensor]
    detail: Callable[[torch.Tensor, torch.Tensor, TaskSpec], list]  # (output, predicted)
    output: str
    prediction: str


def _label_names(output, predicted, spec: TaskSpec) -> list[str]:
    return [spec.label_names[p] if spec.label_names else str(p) for p in predicted.tolist()]


KINDS = {
    "classification": TaskKind(F.cross_entropy, lambda out: out.argmax(-1), _label_names,
                               "logits over the labels 0..{last}", "argmax of the logits"),
    # one logit: p > 0.5 exactly when the logit is positive
    "binary": TaskKind(lambda out, y: F.binary_cross_entropy_with_logits(out, y.float()),
                       lambda out: (out > 0).long(),
                       lambda out, _, spec: torch.sigmoid(out).tolist(),
                       "one logit (squeezed): sigmoid(output) is the probability that the two "
                       "questions are paraphrases",
                       "1 (paraphrase) when output > 0, i.e. probability > 0.5"),
    "regression": TaskKind(F.mse_loss, lambda out: out.clamp(0.0, 5.0),
                           lambda out, _, spec: out.tolist(),
                           "one similarity score (squeezed) on the 0-5 scale of the STS labels",
                           "output clamped to [0, 5]"),
}


def average(kind: str, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several outputs of one task (a both head's two, an ensemble's members') as one
    output of the same meaning, which predict and detail read as one head's: the mean score
    (regression), or the mean probability as log-probabilities (classification: softmax)
    or a logit (binary: sigmoid). In float64: the mean of identical outputs is that output
    exactly (regression), and its argmax or sign is theirs."""
    stacked = torch.stack([o.double() for o in outputs])
    if kind == "regression":
        return stacked.mean(0)
    if kind == "binary":
        return torch.logit(torch.sigmoid(stacked).mean(0))
    return torch.softmax(stacked, dim=-1).mean(0).log()


@dataclass
class Task:
    spec: TaskSpec
    head: TaskHead
    collate: Collator
    batch_size: int
    train: list[Example] = field(default_factory=list)
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    weight: float = 1.0
    train_file: str = ""  # the file `train` was read from (last.pt records its digest)
    # training-loss options (engine/losses.py): a replacement loss and R-Drop's alpha
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    rdrop: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def both_pair(self) -> bool:
        """A pair task with a cross and a bi head (--*_encoding both); a task without a
        head (a loss on its own, in tests) has one output."""
        return getattr(self.head, "both_pair", False)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn or KINDS[self.spec.kind].loss
        if self.both_pair:  # the mean of its cross and bi heads' losses
            cross, bi = output.unbind(-1)
            return self.weight * ((loss(cross, labels) + loss(bi, labels)) / 2)
        return self.weight * loss(output, labels)

    def output(self, raw: torch.Tensor) -> torch.Tensor:
        """The head's output as KINDS reads it: a both head's two outputs averaged."""
        return average(self.spec.kind, raw.unbind(-1)) if self.both_pair else raw

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return KINDS[self.spec.kind].predict(self.output(output))

    def detail(self, output: torch.Tensor, predicted: torch.Tensor) -> list:
        """Per row: the label's name, the paraphrase probability or the raw score."""
        return KINDS[self.spec.kind].detail(self.output(output).cpu(), predicted.cpu(), self.spec)

    def describe(self, dev: dict) -> dict:
        """This task's heads.json entry (how to apply its head by hand; its dev score)."""
        spec, kind = self.spec, KINDS[self.spec.kind]
        outputs = spec.num_outputs if self.head.kind == "linear" else 1
        entry = {"task": self.name, **self.head.describe(self.name, spec.pair), "pair": spec.pair,
                 "num_outputs": outputs,
                 "tensors": {f"{self.name}.{k}": list(v.shape) for k, v in self.head.state_dict().items()},
                 "output": kind.output.format(last=outputs - 1), "prediction": kind.prediction}
        if spec.kind != "regression":
            entry["labels"] = list(spec.label_names) or [str(i) for i in range(outputs)]
        entry["metric"] = spec.metric if spec.evaluated else None
        entry["dev"] = dev.get(self.name) if spec.evaluated else None
        return entry

    @property
    def metric_name(self) -> str:
        return self.spec.metric

    def metric(self, predictions, labels) -> float:
        return METRICS[self.metric_name](predictions, labels)

    def examples(self, split: str) -> list[Example]:
        return {"train": self.train, "dev": self.dev, "test": self.test}[split]


def split_path(spec: TaskSpec, data_dir: str, split: str) -> str:
    return os.path.join(data_dir, spec.files.format(split=FILE_SPLITS[split]))


def read_split(spec: TaskSpec, path: str, labeled: bool = True) -> list[Example]:
    reader = read_pairs if spec.pair else read_sentences
    return reader(path, spec.label if labeled else None)


def read_task_data(spec: TaskSpec, data_dir: str, splits: tuple[str, ...],
                   train_path: str = "") -> dict[str, list[Example]]:
    """The examples of each asked split. Test files are optional (the offline Quora
    re-split has none); a trained-only task (aux) has no dev or test."""
    data = {}
    if "train" in splits:
        data["train"] = read_split(spec, train_path or split_path(spec, data_dir, "train"))
    if spec.evaluated and "dev" in splits:
        data["dev"] = read_split(spec, split_path(spec, data_dir, "dev"))
    test_path = split_path(spec, data_dir, "test") if spec.files else ""
    if spec.evaluated and "test" in splits and os.path.isfile(test_path):
        data["test"] = read_split(spec, test_path, labeled=False)
    return data


def build_task(spec: TaskSpec, data_dir: str, tokenizer, encoder_config, batch_size: int,
               dropout: float, pooling: str = "mean", encoding: str = "cross",
               splits: tuple[str, ...] = SPLITS, train_path: str = "",
               weight: float = 1.0) -> Task:
    """Read a task's files and give it a fresh head."""
    train_file = (train_path or split_path(spec, data_dir, "train")) if "train" in splits else ""
    data = read_task_data(spec, data_dir, splits, train_file)
    head = make_head(spec, encoder_config.hidden_size, dropout, pooling, encoding,
                     encoder_config.initializer_range)
    collate = Collator(tokenizer, separate=head.separate_pair, both=head.both_pair)
    return Task(spec, head, collate, batch_size, weight=weight, train_file=train_file, **data)
