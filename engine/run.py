"""The one run path of both scripts: a shared `RunConfig`, and the functions that train
from a config (seed -> device -> checkpoint folder -> tokenizer and encoder -> model ->
run folder -> fit -> summary) and rebuild a trained model from its best.pt."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, ClassVar

import torch

from base_bert import default_checkpoint_path, from_pretrained
from bert import BertModel
from config import BertConfig
from datasets import default_data_dir
from engine.cli import SEED_RANGE, check_ranges
from engine.errors import CheckpointError, ConfigError
from engine.distributed import Dist, broadcast_object, init_distributed, on_main, shutdown
from evaluation import Predictions, dev_scores, predict_all
from engine.heads import POOLINGS, MultitaskBERT
from engine.paths import check_kind
from engine.runfiles import (CONFIG_FILE, LAST_FILE, SUMMARY_FILE, holds_run, read_json,
                      start_run_dir)
from engine.steplog import require_tensorboard
from engine.tasks import SPLITS, Task
from tokenizer import BertTokenizer
from engine.trainer import Trainer
from utils import autocast_dtype, choose_device, load_checkpoint, seed_everything

# (config, tokenizer, encoder config, splits to read) -> the script's tasks, heads fresh
MakeTasks = Callable[["RunConfig", BertTokenizer, BertConfig, tuple], list[Task]]
SAVED_KEYS = ("model", "config", "bert_config")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RunConfig:
    """What every training script shares; each script's config extends it."""
    option: str = field(default="finetune", metadata=_help(
        "pretrain: encoder frozen, heads trained; finetune: everything trains",
        choices=["pretrain", "finetune"]))
    epochs: int = 3
    lr: float = field(default=0.0, metadata=_help("0: 1e-3 for pretrain, 1e-5 for finetune"))
    head_lr: float = field(default=0.0, metadata=_help(
        "learning rate of the task heads; 0: the same as --lr"))
    weight_decay: float = 0.0
    scheduler: str = field(default="constant", metadata=_help(
        "learning-rate schedule after warmup", choices=["constant", "linear"]))
    warmup_ratio: float = 0.0
    hidden_dropout_prob: float = field(default=0.3, metadata=_help(
        "dropout on the task heads' inputs (linear and Quora bi-encoder heads; the STS cosine "
        "head has no parameters and no dropout; the encoder keeps its checkpoint's dropout)"))
    seed: int = 11711
    use_gpu: bool = field(default=False, metadata=_help("use CUDA when present"))
    checkpoint: str = field(default="", metadata=_help(
        "HF-format BERT folder (default: the packaged all-MiniLM-L6-v2)"))
    data_dir: str = field(default_factory=default_data_dir, metadata=_help(
        "data folder (env MINBERT_DATA_DIR)"))
    max_length: int = field(default=128, metadata=_help(
        "tokens per input, at least 4 and at most the checkpoint's max_position_embeddings"))
    pooling: str = field(default="mean", metadata=_help(
        "sentence vector for the linear heads", choices=list(POOLINGS)))
    bucket: bool = field(default=True, metadata=_help("length-bucketed training batches"))
    run_dir: str = field(default="", metadata=_help("output folder (default runs/<name>-<time>)"))
    progress: bool = field(default=True, metadata=_help("tqdm progress bars"))
    precision: str = field(default="fp32", metadata=_help(
        "bf16: bfloat16 autocast; fp16: float16 autocast with loss scaling (GPUs); auto: bf16 "
        "where the hardware computes it natively, else fp16 on a GPU, fp32 on a CPU",
        choices=["fp32", "bf16", "fp16", "auto"]))
    grad_accumulation: int = field(default=1, metadata=_help(
        "micro-batches per step: each step's batch is batch size x N (x processes), its "
        "gradients accumulated over N forward/backward passes (less memory, same update)"))
    save_every_steps: int = field(default=500, metadata=_help(
        "also save the resumable state (last.pt) every N steps (0: only after each epoch); "
        "500 steps are ~8 min of the full recipe on a 2-core CPU"))
    log_every_steps: int = field(default=10, metadata=_help(
        "append the mean task losses (and gradient statistics) of every N steps to "
        "steps.jsonl (0: off)"))
    tensorboard: bool = field(default=False, metadata=_help(
        "also write steps.jsonl's records as TensorBoard events (RUN/tensorboard)"))
    resume: str = field(default="", metadata=_help(
        "continue the interrupted run in this folder, with its saved configuration"))
    config: str = field(default="", metadata=_help(
        "a run's config.json: start a new run with its settings (not its run_dir); the "
        "flags given beside --config override them"))
    # [low, high) of every int option (high None: no bound), checked by cli.check_ranges
    INT_RANGES: ClassVar[dict] = {"epochs": (1, None), "seed": SEED_RANGE, "max_length": (4, None),
                                  "grad_accumulation": (1, None), "save_every_steps": (0, None),
                                  "log_every_steps": (0, None)}

    def __post_init__(self) -> None:
        if not self.lr:
            self.lr = 1e-3 if self.option == "pretrain" else 1e-5
        self.check_number("lr", self.lr, low=0.0, low_open=True)
        self.check_number("head_lr", self.head_lr, low=0.0)
        self.check_number("weight_decay", self.weight_decay, low=0.0)
        self.check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        self.check_number("hidden_dropout_prob", self.hidden_dropout_prob, low=0.0, high=1.0)
        check_ranges(self)  # max_length >= 4: [CLS] a [SEP] b [SEP]

    @staticmethod
    def check_number(name: str, value: float, low: float, high: float = math.inf,
                     low_open: bool = False) -> None:
        """A finite value in [low, high) (or (low, high))."""
        if not (math.isfinite(value) and value >= low and value < high
                and not (low_open and value == low)):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g})"
            raise ConfigError(f"--{name} must be a finite number in {bounds}, got {value}")

    @property
    def freeze_encoder(self) -> bool:
        return self.option == "pretrain"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: dict, **changes) -> "RunConfig":
        """A config as a run saved it; keys of other versions are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**saved, **changes}.items() if k in known})


@dataclass
class Setup:
    """What every run starts from: the device, the checkpoint folder (resolved once), its
    tokenizer and the pretrained encoder."""
    device: torch.device
    folder: str
    tokenizer: BertTokenizer
    encoder: BertModel


def setup(cfg: RunConfig, dist: Dist | None = None) -> Setup:
    seed_everything(cfg.seed)
    device = dist.device if dist is not None and dist.enabled else choose_device(cfg.use_gpu)
    folder = cfg.checkpoint or default_checkpoint_path()
    encoder = from_pretrained(folder)
    check_max_length(cfg, encoder.config)
    return Setup(device, folder, BertTokenizer.from_pretrained(folder, cfg.max_length), encoder)


def check_max_length(cfg: RunConfig, bert_config: BertConfig) -> None:
    """Up front: a long sentence must not stop a run halfway."""
    if cfg.max_length > bert_config.max_position_embeddings:
        raise ConfigError(f"--max_length {cfg.max_length} exceeds the checkpoint's "
                          f"max_position_embeddings ({bert_config.max_position_embeddings})")


def build_model(cfg: RunConfig, encoder: BertModel, tasks: list[Task],
                device: torch.device) -> MultitaskBERT:
    return MultitaskBERT(encoder, {t.name: t.head for t in tasks},
                         autocast=autocast_dtype(cfg.precision, device))


def train(cfg: RunConfig, script: str, make_tasks: MakeTasks, name: str,
          log: Callable[[str], None] = print) -> tuple[str, dict, list[Task]]:
    """Train from a config (or continue the run in cfg.resume); returns the run folder,
    the summary and the tasks. Under torchrun: one process per rank, data-parallel."""
    dist = init_distributed(cfg.use_gpu)
    try:
        return _train(cfg, script, make_tasks, name, dist, log if dist.is_main else lambda *_: None)
    finally:
        shutdown()


def _train(cfg: RunConfig, script: str, make_tasks: MakeTasks, name: str, dist: Dist,
           log: Callable[[str], None]) -> tuple[str, dict, list[Task]]:
    if cfg.tensorboard:  # before the run folder: a refused run leaves none
        on_main(dist, require_tensorboard)
    s = setup(cfg, dist)
    if dist.rank > 0:  # the same weights everywhere (DDP broadcasts them); other dropout draws
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    tasks = make_tasks(cfg, s.tokenizer, s.encoder.config, SPLITS)
    model = build_model(cfg, s.encoder, tasks, s.device)
    run_dir = cfg.resume or cfg.run_dir or os.path.join(
        "runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = broadcast_object(run_dir)  # the time-stamped name of rank 0
    if not cfg.resume:  # a refused folder stops every rank at once
        on_main(dist, start_run_dir, run_dir, {**cfg.as_dict(), "world_size": dist.world_size})
    autocast = f" ({str(model.autocast).replace('torch.', '')} autocast)" if model.autocast else ""
    log(f"{'resuming ' if cfg.resume else ''}{name} on {s.device}{autocast}"
        f"{f' x {dist.world_size} processes' if dist.enabled else ''}: checkpoint {s.folder}")
    for task in tasks:
        log(f"  {task.name}: {len(task.train)} train, {len(task.dev)} dev, {len(task.test)} "
            f"test, batch {global_batch(task.batch_size, cfg, dist)}")
    extra = {"script": script, "config": cfg.as_dict(), "bert_config": asdict(s.encoder.config)}
    summary = Trainer(model, tasks, cfg, dist, run_dir, extra, log).fit(resume=bool(cfg.resume))
    return run_dir, summary, tasks


def global_batch(batch_size: int, cfg: RunConfig, dist: Dist) -> str:
    parts = [str(batch_size)] + [f"{n} {what}" for n, what in
                                 ((cfg.grad_accumulation, "micro-batches"),
                                  (dist.world_size, "processes")) if n > 1]
    total = batch_size * cfg.grad_accumulation * dist.world_size
    return " x ".join(parts) + (f" = {total}" if total != batch_size else "")


# Flags that change nothing a resumed run computes.
HARMLESS_ON_RESUME = ("resume", "progress", "save_every_steps")


def resume_config(cls, given: dict) -> RunConfig:
    """The saved configuration of the run in --resume; a flag that would change the result
    is refused (a resumed run equals an uninterrupted one)."""
    folder = given["resume"]
    check_kind("--resume", folder, "run")
    changed = sorted(set(given) - set(HARMLESS_ON_RESUME))
    if changed:
        raise ConfigError(f"--resume continues {folder} with its saved configuration; these "
                          f"flags would change it: {', '.join('--' + c for c in changed)}")
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise ConfigError(f"--resume {folder}: no {CONFIG_FILE}, not a run folder")
    if not os.path.isfile(os.path.join(folder, LAST_FILE)):
        done = os.path.isfile(os.path.join(folder, SUMMARY_FILE))
        raise ConfigError(f"--resume {folder}: " + ("the run is already complete" if done else
                          f"no {LAST_FILE} (it stopped before its first save); start it again"))
    saved = read_json(os.path.join(folder, CONFIG_FILE))
    return cls.from_saved(saved, **{k: v for k, v in given.items() if k in HARMLESS_ON_RESUME})


def saved_script(saved: dict) -> str:
    """The script that trained a loaded best.pt: "classifier" or "multitask"."""
    # checkpoints from before the "script" key: only classifier.py saved a "task"
    return saved.get("script") or ("classifier" if "task" in saved["config"] else "multitask")


def load_saved(path: str, script: str | None = None) -> dict:
    """A best.pt of `script` (None: of either script); another script's checkpoint is
    refused by name."""
    check_kind("--load", path, "model")
    saved = load_checkpoint(path, SAVED_KEYS)
    found = saved_script(saved)
    if found != script and (script is not None or found not in ("classifier", "multitask")):
        raise CheckpointError(f"{path}: a {found} checkpoint; this script reads {script} ones "
                              f"(use {found}.py)" if found in ("classifier", "multitask")
                              else f"{path}: unknown kind of checkpoint {found!r}")
    return saved


def rebuild(saved: dict, cfg: RunConfig, make_tasks: MakeTasks, splits: tuple,
            device: torch.device, source: str) -> tuple[MultitaskBERT, list[Task]]:
    """The model a checkpoint was trained as, its weights loaded strictly, with the tasks
    of `splits` (no training file is read for evaluation)."""
    bert_config = BertConfig(**saved["bert_config"])
    check_max_length(cfg, bert_config)
    folder = cfg.checkpoint or default_checkpoint_path()
    tasks = make_tasks(cfg, BertTokenizer.from_pretrained(folder, cfg.max_length), bert_config,
                       splits)
    model = build_model(cfg, BertModel(bert_config), tasks, device)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{source}: its tensors do not fit the model of its own "
                              f"config ({str(err).splitlines()[0]})") from None
    return model.to(device), tasks


def evaluation_dir(load: str, run_dir: str) -> str:
    """Where --eval_only writes: never over a run, never over an earlier evaluation."""
    if run_dir:
        if holds_run(run_dir):
            raise ConfigError(f"--run_dir {run_dir} already holds a run or an evaluation "
                              f"({', '.join(holds_run(run_dir))}); choose another folder")
        return run_dir
    base = os.path.join(os.path.dirname(os.path.abspath(load)), "eval")
    candidates = [base] + [f"{base}-{n}" for n in range(2, 1000)]
    return next(path for path in candidates if not holds_run(path))


def evaluate_saved(load: str, cfg: RunConfig, make_tasks: MakeTasks, saved: dict,
                   run_dir: str, device: torch.device) -> tuple[list[Predictions], dict]:
    """--eval_only: predictions of every evaluated task on dev and test, written to
    `run_dir`; returns them and the dev scores."""
    model, tasks = rebuild(saved, cfg, make_tasks, ("dev", "test"), device, load)
    predictions = predict_all(model, tasks, device, ("dev", "test"))
    for p in predictions:
        p.write(run_dir)
    return predictions, dev_scores(predictions)

