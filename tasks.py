"""Tasks: each is a small object (name, data, head, loss, predict, metric), so that the
training loops never branch on a task's name.

Heads take the shared encoder and a batch and return the task's raw output: logits
(B, C) for classification, one logit (B,) for binary paraphrase detection, a score (B,)
for similarity. Pair tasks come in two encodings (the report's section 4.2):
  cross: `[CLS] a [SEP] b [SEP]` as one input, a linear layer on its pooled vector;
  bi:    each sentence encoded alone and mean-pooled (u, v); similarity scored as
         5 * cos(u, v), paraphrase classified from [u, v, |u - v|, u * v].
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch import nn

from bert import BertModel, init_module, mean_pool
from evaluation import METRICS
from datasets import (PARAPHRASE, SENTIMENT_2, SENTIMENT_5, SIMILARITY, Batch, Collator,
                      Example, LabelSpec, read_pairs, read_sentences)

POOLINGS = ("mean", "cls", "pooler")
ENCODINGS = ("cross", "bi")


def pool(encoder: BertModel, batch: Batch, pooling: str) -> torch.Tensor:
    """One vector per input: (B, H). MiniLM was trained on mean pooling; its pooler
    layer looks untrained, so "pooler" suits bert-base more than it suits MiniLM."""
    out = encoder(**batch.encoded.as_kwargs())
    if pooling == "mean":
        return mean_pool(out.last_hidden_state, batch.encoded.attention_mask)
    if pooling == "cls":
        return out.last_hidden_state[:, 0]
    return out.pooler_output


class LinearHead(nn.Module):
    """Dropout and a linear layer on the pooled input: classes, or one output squeezed."""

    def __init__(self, hidden: int, outputs: int, dropout: float, pooling: str):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, outputs)
        self.pooling = pooling
        self.reads_pooler = pooling == "pooler"  # MultitaskBERT.train_encoder freezes an unread pooler

    def forward(self, encoder: BertModel, batch: Batch) -> torch.Tensor:
        logits = self.linear(self.dropout(pool(encoder, batch, self.pooling)))  # (B, C)
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits


class BiEncoderHead(nn.Module):
    """Scores a pair from its two separately encoded, mean-pooled sentences."""

    def __init__(self, hidden: int, dropout: float, score: str):
        super().__init__()
        self.score = score
        self.reads_pooler = False
        self.dropout = nn.Dropout(dropout)
        # Sentence-BERT's classification features (Reimers & Gurevych, 2019, eq. 1).
        self.linear = nn.Linear(4 * hidden, 1) if score == "features" else None

    def forward(self, encoder: BertModel, batch: Batch) -> torch.Tensor:
        pooled = pool(encoder, batch, "mean")  # (2B, H): first sentences, then seconds
        u, v = pooled.chunk(2)  # (B, H) each
        if self.score == "cosine":
            return 5.0 * F.cosine_similarity(u, v, dim=-1)  # (B,) on the 0-5 label scale
        features = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)  # (B, 4H)
        return self.linear(self.dropout(features)).squeeze(-1)


def classification_loss(output, labels):
    return F.cross_entropy(output, labels)


def binary_loss(output, labels):
    return F.binary_cross_entropy_with_logits(output, labels.float())


def regression_loss(output, labels):
    return F.mse_loss(output, labels)


KINDS = {
    # kind: (loss, predict, metric name)
    "classification": (classification_loss, lambda out: out.argmax(-1), "accuracy"),
    "binary": (binary_loss, lambda out: (out > 0).long(), "accuracy"),  # p > 0.5
    "regression": (regression_loss, lambda out: out.clamp(0.0, 5.0), "pearson"),
}


@dataclass
class TaskSpec:
    """Where a task's data lives and what it predicts."""
    name: str
    files: str  # a pattern with {split}: train, dev, test-student
    pair: bool
    label: LabelSpec
    kind: str
    num_outputs: int
    prediction_label: str  # the column name of the prediction files
    evaluated: bool = True


SPECS = {
    "sst": TaskSpec("sst", "ids-sst-{split}.csv", False, SENTIMENT_5, "classification", 5,
                    "Sentiment"),
    "cfimdb": TaskSpec("cfimdb", "ids-cfimdb-{split}.csv", False, SENTIMENT_2,
                       "classification", 2, "Sentiment"),
    "quora": TaskSpec("quora", "quora-{split}.csv", True, PARAPHRASE, "binary", 1,
                      "Is_Paraphrase"),
    "sts": TaskSpec("sts", "sts-{split}.csv", True, SIMILARITY, "regression", 1,
                    "Similarity"),
}


@dataclass
class Task:
    spec: TaskSpec
    head: nn.Module
    collate: Collator
    batch_size: int
    train: list[Example]
    dev: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.spec.name

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.weight * KINDS[self.spec.kind][0](output, labels)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return KINDS[self.spec.kind][1](output)

    @property
    def metric_name(self) -> str:
        return KINDS[self.spec.kind][2]

    def metric(self, predictions, labels) -> float:
        return METRICS[self.metric_name](predictions, labels)


def make_head(spec: TaskSpec, hidden: int, dropout: float, pooling: str, encoding: str,
              std: float) -> nn.Module:
    if spec.pair and encoding == "bi":
        head = BiEncoderHead(hidden, dropout, "cosine" if spec.kind == "regression" else "features")
    else:
        head = LinearHead(hidden, spec.num_outputs, dropout, pooling)
    head.apply(lambda m: init_module(m, std))
    return head


def split_path(spec: TaskSpec, data_dir: str, split: str) -> str:
    return os.path.join(data_dir, spec.files.format(split=split))


def read_split(spec: TaskSpec, data_dir: str, split: str, labeled: bool = True) -> list[Example]:
    path = split_path(spec, data_dir, split)
    reader = read_pairs if spec.pair else read_sentences
    return reader(path, spec.label if labeled else None)


def build_task(spec: TaskSpec, data_dir: str, tokenizer, encoder_config, batch_size: int,
               dropout: float, pooling: str = "mean", encoding: str = "cross",
               with_eval: bool = True, train_path: str | None = None,
               weight: float = 1.0) -> Task:
    """Read a task's files and give it a fresh head."""
    train = (read_pairs if spec.pair else read_sentences)(train_path, spec.label) \
        if train_path else read_split(spec, data_dir, "train")
    dev = read_split(spec, data_dir, "dev") if with_eval and spec.evaluated else []
    # Test files are optional (the offline Quora re-split has none): no file, no test predictions.
    has_test = os.path.isfile(split_path(spec, data_dir, "test-student"))
    test = read_split(spec, data_dir, "test-student", labeled=False) \
        if with_eval and spec.evaluated and has_test else []
    head = make_head(spec, encoder_config.hidden_size, dropout, pooling, encoding,
                     encoder_config.initializer_range)
    collate = Collator(tokenizer, separate=spec.pair and encoding == "bi")
    return Task(spec, head, collate, batch_size, train, dev, test, weight)


def aux_spec(name: str = "aux") -> TaskSpec:
    """The report's auxiliary Yelp task: 5-star sentiment, trained, never evaluated."""
    return TaskSpec(name, "", False, SENTIMENT_5, "classification", 5, "Sentiment",
                    evaluated=False)

