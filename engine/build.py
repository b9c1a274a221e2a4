"""Everything a training run is made of, built in one place (as a torchtune recipe's
setup() does): the model on its device with the encoder frozen or not, one training
stream per task, the optimizers and their schedules, the gradient combination and the
step context. The Trainer receives these parts built; nothing patches them afterwards."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from datasets import TrainStream
from engine.combiner import Combiner
from engine.compiling import compile_losses
from engine.configs import RunConfig
from engine.distributed import Dist
from engine.heads import MultitaskBERT
from engine.layer_decay import layer_groups
from engine.precision import Precision
from engine.row_gradients import use_row_gradients
from engine.sampled_stream import build_sampled
from engine.step import StepContext, make_context
from engine.task_mixing import TaskMixer
from engine.tasks import Task
from optimizer import AdamW


def make_optimizer(encoder_params, head_params, cfg: RunConfig, total_steps: int,
                   encoder: torch.nn.Module | None = None):
    """AdamW with the encoder at lr and the freshly initialised heads at head_lr (or lr),
    all on one warmup/decay schedule. --layer_decay: a group per layer of `encoder` (the
    module of encoder_params), see layer_decay.py."""
    if cfg.layer_decay != 1.0:
        groups = layer_groups(encoder, encoder_params, head_params, cfg.lr,
                              cfg.head_lr or cfg.lr, cfg.layer_decay)
    else:
        groups = [{"params": [p for p in params if p.requires_grad], "lr": lr}
                  for params, lr in ((encoder_params, cfg.lr), (head_params, cfg.head_lr or cfg.lr))]
    optimizer = AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                      weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Parts:
    """`optimizers`: name -> (optimizer, scheduler): one "mix" pair, or (seq) one per task
    over the encoder and that task's head. `combiner`: mix mode only. `streams`: SampledStream
    under `mixer` (--sampling temperature / annealed), else datasets.TrainStream."""
    model: MultitaskBERT
    tasks: list[Task]
    streams: dict[str, TrainStream]
    optimizers: dict[str, tuple]
    steps_per_epoch: int
    combiner: Combiner | None
    ctx: StepContext
    precision: Precision
    mixer: TaskMixer | None = None  # sampled mix steps (task_mixing.py); None: cycle


def build_parts(cfg: RunConfig, model: MultitaskBERT, tasks: list[Task], dist: Dist) -> Parts:
    model.to(dist.device)
    model.train_encoder(not cfg.freeze_encoder)
    if cfg.freeze_word_embeddings:
        model.encoder.word_embedding.requires_grad_(False)
    use_row_gradients(model.encoder, dist.device, dist.enabled)
    sampled = build_sampled(cfg, tasks, dist)  # --sampling temperature / annealed
    mixer, streams = sampled or (None, {
        t.name: TrainStream(t.train, t.collate, t.batch_size, cfg.bucket, cfg.seed,
                            cfg.grad_accumulation, dist.rank, dist.world_size,
                            pin=dist.device.type == "cuda")
        for t in tasks})
    encoder_params = list(model.encoder.parameters())
    combiner = None
    if cfg.mode == "mix":
        steps = mixer.steps_per_epoch if mixer else max(len(s) for s in streams.values())
        optimizers = {"mix": make_optimizer(encoder_params, model.heads.parameters(), cfg,
                                            cfg.epochs * steps, model.encoder)}
        combiner = Combiner.build(cfg.combination(), [p for p in encoder_params if p.requires_grad],
                                  len(tasks), cfg.seed, dist, cfg.grad_accumulation,
                                  sparse_rows=[model.encoder.word_embedding.weight])
    else:
        steps = 0
        optimizers = {t.name: make_optimizer(encoder_params, t.head.parameters(), cfg,
                                             cfg.epochs * len(streams[t.name]), model.encoder)
                      for t in tasks}
    ctx = make_context(model, tasks, dist, model.precision, find_unused=cfg.mode == "seq",
                       combined=combiner.params if combiner is not None else [], packed=cfg.packed)
    if cfg.compile:  # in place, DDP (if any) wrapping it: ctx.losses calls it too
        compile_losses(ctx.local, cfg.compile_mode, dist.device)
    return Parts(model, tasks, streams, optimizers, steps, combiner, ctx, model.precision, mixer)
