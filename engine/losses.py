"""Training-loss options of the multitask script: label smoothing, CoSENT for the STS
bi-encoder, and R-Drop. They change what training minimises, never how a task predicts
(tasks.KINDS' predict is untouched), and each is off by default.

- label smoothing (Szegedy et al., 2016): cross-entropy against (1 - eps) one-hot + eps / C.
  Quora's head is one logit under binary cross-entropy; its smoothed target
  y (1 - eps) + eps / 2 is exactly 2-class label smoothing on the logits (0, z).
- CoSENT (Su, 2022; sentence-transformers' CoSENTLoss): log(1 + sum over the pairs (i, j)
  of a batch with label_i > label_j of exp(scale (cos_j - cos_i))), scale 20. It ranks the
  pairs of a batch, so it is taken within each micro-batch (and each process's share).
- R-Drop (Liang et al., NeurIPS 2021): a chosen task's batch goes through the model twice
  (independent dropout masks); its loss is the mean of the two task losses plus alpha
  times the mean over examples of the symmetric KL 1/2 (KL(p1||p2) + KL(p2||p1)) of the
  two predicted distributions (classification; Quora as Bernoulli), or alpha times the
  MSE between the two predicted scores (regression: STS). The official code sums the KL
  over the batch instead, so its alpha is ours divided by the batch size.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

COSENT_SCALE = 20.0
COSINE_OUTPUT = 5.0  # heads.BiEncoderHead's cosine score is 5 * cos(u, v)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=eps)


def smoothed_binary(logit: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    target = labels.to(logit.dtype) * (1.0 - eps) + eps / 2.0
    return F.binary_cross_entropy_with_logits(logit, target)


SMOOTHED = {"classification": smoothed_cross_entropy, "binary": smoothed_binary}


def cosent_loss(output: torch.Tensor, labels: torch.Tensor,
                scale: float = COSENT_SCALE) -> torch.Tensor:
    """`output`: the cosine head's 5 cos per pair, (B,); `labels`: the gold scores."""
    score = scale * (output / COSINE_OUTPUT)
    gap = score[None, :] - score[:, None]  # gap[i, j] = s_j - s_i
    ordered = labels[:, None] > labels[None, :]  # the pairs (i, j) with label_i > label_j
    # the 0 is the "1 +": log(e^0 + sum e^gap), in logsumexp's stable form
    return torch.logsumexp(torch.cat([gap.new_zeros(1), gap[ordered]]), dim=0)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """1/2 (KL(p_a||p_b) + KL(p_b||p_a)) = 1/2 sum (p_a - p_b)(log p_a - log p_b), the
    mean over the rows."""
    log_a, log_b = F.log_softmax(logits_a, dim=-1), F.log_softmax(logits_b, dim=-1)
    return 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1).mean()


def two_class(logit: torch.Tensor) -> torch.Tensor:
    """One logit z as the logits (0, z): softmax gives (1 - sigmoid(z), sigmoid(z))."""
    return torch.stack([torch.zeros_like(logit), logit], dim=-1)


def consistency(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R-Drop's term between two passes' outputs of one task kind."""
    if kind == "regression":
        return F.mse_loss(a, b)
    if kind == "binary":
        a, b = two_class(a), two_class(b)
    return symmetric_kl(a, b)


def doubled(tasks: dict, names: list[str], batches: list) -> tuple[list[str], list]:
    """The step's batches with R-Drop's tasks' batches once more at the end: the second
    pass over the same examples draws other dropout masks (in the same packed pass)."""
    again = [k for k, name in enumerate(names) if tasks[name].rdrop]
    return names + [names[k] for k in again], batches + [batches[k] for k in again]


def fold(tasks: dict, names: list[str], outputs: list, batches: list) -> list[torch.Tensor]:
    """Each task's loss from the outputs of `doubled`'s batches: the plain loss, or
    R-Drop's (mean of the two passes' losses + alpha * consistency, all times the task's
    weight, as the plain loss is)."""
    second = iter(outputs[len(names):])
    losses = []
    for name, out, batch in zip(names, outputs, batches):
        task = tasks[name]
        loss = task.loss(out, batch.labels)
        if task.rdrop:
            again = next(second)
            loss = (0.5 * (loss + task.loss(again, batch.labels))
                    + task.weight * task.rdrop * consistency(task.spec.kind, out, again))
        losses.append(loss)
    return losses


def configure_losses(cfg, tasks: list) -> None:
    """Give `tasks` the loss options of a MultitaskConfig (checked there)."""
    smoothed, rdrop = set(cfg.smoothed_task_names), set(cfg.rdrop_task_names)
    for task in tasks:
        if task.name in smoothed:
            task.loss_fn = partial(SMOOTHED[task.spec.kind], eps=cfg.label_smoothing)
        if task.name == "sts" and cfg.sts_loss == "cosent":
            task.loss_fn = cosent_loss
        task.rdrop = cfg.rdrop if task.name in rdrop else 0.0
