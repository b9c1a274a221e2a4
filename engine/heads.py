"""Task heads and the multitask model: one shared encoder, one head per task (the
report's section 4.2).

Heads take the shared encoder's output for a batch (bert.BertOutput: from one call per
batch, or from BertModel.forward_many for all of a step's tasks at once) and the batch, and
return the task's raw output: logits (B, C) for classification, one logit (B,) for binary
paraphrase detection, a score (B,) for similarity. The caller runs the encoder, so that a
training step can encode every task's sequences in one pass. Pair tasks come in three encodings:
  cross: `[CLS] a [SEP] b [SEP]` as one input, a linear layer on its pooled vector;
  bi:    each sentence encoded alone and mean-pooled (u, v); similarity scored as
         5 * cos(u, v), paraphrase classified from [u, v, |u - v|, u * v];
  both:  a cross head and a bi head on the same pair, their outputs stacked (B, 2); the
         task trains on the mean of their losses and predicts from the mean of their
         scores or probabilities (tasks.average).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bert import BertModel, BertOutput, init_module, mean_pool
from datasets import Batch
from engine.precision import Precision
from engine.specs import TaskSpec



def pool(out: BertOutput, batch: Batch, pooling: str) -> torch.Tensor:
    """One vector per input: (B, H). MiniLM was trained on mean pooling; its pooler
    layer looks untrained, so "pooler" suits bert-base more than it suits MiniLM."""
    if pooling == "mean":
        return mean_pool(out.last_hidden_state, batch.encoded.attention_mask)
    if pooling == "cls":
        return out.last_hidden_state[:, 0]
    return out.pooler_output


POOLING_TEXT = {
    "mean": "x = mean of last_hidden_state over the tokens whose attention_mask is 1 "
            "([CLS] and [SEP] included)",
    "cls": "x = last_hidden_state[:, 0] (the [CLS] token)",
    "pooler": "x = pooler_output = tanh(pooler.dense(last_hidden_state[:, 0]))",
}
SINGLE_INPUT = "one sentence: [CLS] s [SEP], token_type_ids all 0"
CROSS_INPUT = ("the pair as one input: [CLS] a [SEP] b [SEP], token_type_ids 0 up to the "
               "first [SEP] and 1 after it; truncated longest-first to max_length")
BI_INPUT = ("each sentence encoded alone as [CLS] s [SEP]; u, v = the mean of "
            "last_hidden_state over the tokens whose attention_mask is 1, per sentence")


class TaskHead(nn.Module):
    """What the training code asks of every head, and how it describes itself to a reader
    of an export (heads.json): its kind, input, formula and pooling."""
    kind: str = ""
    reads_pooler: bool = False  # MultitaskBERT.train_encoder freezes an unread pooler
    separate_pair: bool = False  # a pair's sentences are encoded as two inputs (bi-encoder)
    both_pair: bool = False  # a pair is encoded both ways: cross rows, then the bi rows
    pooling: str = "mean"

    def describe(self, task: str, pair: bool) -> dict:
        """How to apply this head by hand to the exported encoder's outputs."""
        raise NotImplementedError


class LinearHead(TaskHead):
    """Dropout and a linear layer on the pooled input: classes, or one output squeezed."""
    kind = "linear"

    def __init__(self, hidden: int, outputs: int, dropout: float, pooling: str):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, outputs)
        self.pooling = pooling
        self.reads_pooler = pooling == "pooler"

    def forward(self, out: BertOutput, batch: Batch) -> torch.Tensor:
        logits = self.linear(self.dropout(pool(out, batch, self.pooling)))  # (B, C)
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits

    def describe(self, task: str, pair: bool) -> dict:
        return {"kind": self.kind, "pooling": self.pooling,
                "input": CROSS_INPUT if pair else SINGLE_INPUT,
                "formula": f"{POOLING_TEXT[self.pooling]}; output = x @ {task}.linear.weight.T "
                           f"+ {task}.linear.bias"}


class BiEncoderHead(TaskHead):
    """Scores a pair from its two separately encoded, mean-pooled sentences. The cosine
    score has no parameters and no dropout: `dropout` acts on the features head only."""
    separate_pair = True

    def __init__(self, hidden: int, dropout: float, score: str):
        super().__init__()
        self.score = score
        self.kind = f"bi_{score}"
        self.dropout = nn.Dropout(dropout)
        # Sentence-BERT's classification features (Reimers & Gurevych, 2019, eq. 1).
        self.linear = nn.Linear(4 * hidden, 1) if score == "features" else None

    def forward(self, out: BertOutput, batch: Batch) -> torch.Tensor:
        pooled = pool(out, batch, "mean")  # (2B, H): first sentences, then seconds
        u, v = pooled.chunk(2)  # (B, H) each
        if self.score == "cosine":
            return 5.0 * F.cosine_similarity(u, v, dim=-1)  # (B,) on the 0-5 label scale
        features = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)  # (B, 4H)
        return self.linear(self.dropout(features)).squeeze(-1)

    def describe(self, task: str, pair: bool) -> dict:
        formula = ("output = 5 * cosine_similarity(u, v)" if self.score == "cosine" else
                   f"output = concat([u, v, |u - v|, u * v]) @ {task}.linear.weight.T "
                   f"+ {task}.linear.bias")
        return {"kind": self.kind, "pooling": "mean", "input": BI_INPUT, "formula": formula}


BOTH_INPUT = ("the pair encoded both ways in one batch: first the B cross inputs, then "
              "the 2B single sentences (first sentences, then seconds)")
BOTH_FORMULA = {"cosine": "output = (cross + bi) / 2: the mean of the two scores",
                "features": "output = logit((sigmoid(cross) + sigmoid(bi)) / 2): the mean of "
                            "the two probabilities, as a logit"}


class BothHead(TaskHead):
    """A cross head and a bi head on the same pair (one batch holds the pair both ways:
    datasets.Collator(both=True)). Returns both raw outputs, (B, 2): cross, bi; the task
    averages them (tasks.Task.output) and trains on both (tasks.Task.loss)."""
    kind = "both"
    both_pair = True

    def __init__(self, hidden: int, dropout: float, pooling: str, score: str):
        super().__init__()
        self.cross = LinearHead(hidden, 1, dropout, pooling)
        self.bi = BiEncoderHead(hidden, dropout, score)
        self.pooling, self.reads_pooler = pooling, self.cross.reads_pooler

    def forward(self, out: BertOutput, batch: Batch) -> torch.Tensor:
        size = len(batch)
        cross = self.cross(*rows(out, batch, 0, size))
        bi = self.bi(*rows(out, batch, size, 3 * size))
        return torch.stack([cross, bi], dim=-1)  # (B, 2)

    def describe(self, task: str, pair: bool) -> dict:
        return {"kind": self.kind, "pooling": self.pooling, "input": BOTH_INPUT,
                "formula": BOTH_FORMULA[self.bi.score],
                "cross": self.cross.describe(f"{task}.cross", pair),
                "bi": self.bi.describe(f"{task}.bi", pair)}


def rows(out: BertOutput, batch: Batch, start: int, end: int) -> tuple[BertOutput, Batch]:
    """The encoder's output and the batch for rows [start, end) of a batch's inputs."""
    encoded = batch.encoded
    part = type(encoded)(*(t[start:end] for t in (encoded.input_ids, encoded.token_type_ids,
                                                  encoded.attention_mask)))
    return (BertOutput(out.last_hidden_state[start:end], out.pooler_output[start:end]),
            Batch(batch.ids, part, batch.labels))


def head_kind(spec: TaskSpec, encoding: str) -> str:
    """linear, bi_cosine, bi_features or both: the one rule of which head a task gets
    (`encoding` matters for pair tasks only)."""
    if spec.pair and encoding == "bi":
        return "bi_cosine" if spec.kind == "regression" else "bi_features"
    if spec.pair and encoding == "both":
        return "both"
    return "linear"


def make_head(spec: TaskSpec, hidden: int, dropout: float, pooling: str, encoding: str,
              std: float) -> TaskHead:
    """A freshly initialised head."""
    kind = head_kind(spec, encoding)
    if kind == "linear":
        head = LinearHead(hidden, spec.num_outputs, dropout, pooling)
    elif kind == "both":
        head = BothHead(hidden, dropout, pooling, head_kind(spec, "bi").removeprefix("bi_"))
    else:
        head = BiEncoderHead(hidden, dropout, kind.removeprefix("bi_"))
    head.apply(lambda m: init_module(m, std))
    return head


class MultitaskBERT(nn.Module):
    """One shared encoder and one head per task. The forward pass runs under `precision`'s
    autocast (fp32 weights, optimizer and losses); outputs come back as fp32."""

    def __init__(self, encoder: BertModel, heads: dict[str, TaskHead],
                 precision: Precision | None = None):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.precision = precision or Precision("fp32", "cpu")

    def forward(self, task_name: str, batch: Batch) -> torch.Tensor:
        with self.precision.autocast():
            out = self.encoder(**batch.encoded.as_kwargs())
            return self.heads[task_name](out, batch).float()

    def forward_many(self, task_names: list[str], batches: list[Batch]) -> list[torch.Tensor]:
        """`forward` for several tasks' batches with ONE encoder pass over all their
        sequences (BertModel.forward_many): larger matrix products, no padding."""
        with self.precision.autocast():
            outs = self.encoder.forward_many([b.encoded for b in batches])
            return [self.heads[n](out, b).float() for n, out, b in zip(task_names, outs, batches)]

    def train_encoder(self, train: bool) -> None:
        """Freeze or unfreeze the encoder. The pooler layer trains only if a head reads it:
        unread, it would get all-zero gradients from PCGrad's buffers and still decay under
        weight decay."""
        self.encoder.requires_grad_(train)
        if not any(head.reads_pooler for head in self.heads.values()):
            self.encoder.pooler_dense.requires_grad_(False)
