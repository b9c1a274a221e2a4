"""The configuration of each training script, torch-free: one dataclass per script, turned
into argparse by engine/cli.py and saved as the run's config.json. grid.py, the analysis
tools, export.py and predict.py read a saved config through these classes (`from_saved`),
so that a default lives in one place."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from engine.cli import SEED_RANGE, check_ranges, repeated
from engine.config_checks import check_multitask
from engine.errors import ConfigError
from engine.names import (AGGREGATORS, BALANCERS, COMPILE_MODES, ENCODINGS, MODES, OPTIONS,
                          PCGRAD_REDUCTIONS, POOLINGS, PRECISIONS, SAMPLINGS, SCHEDULERS,
                          STS_LOSSES)
from engine.specs import AUX, CLASSIFIER_TASKS, TASK_NAMES, canonical_tasks

DATA_DIR_ENV = "MINBERT_DATA_DIR"


def default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, "data")


@dataclass(frozen=True)
class Combination:
    """How a mix step combines the tasks' encoder gradients (engine/combiner.py builds it):
    the aggregator and its options, the loss balancing, and the diagnostics' sampling
    (every Nth step; 0: never)."""
    aggregator: str = "sum"
    options: tuple = ()  # (name, value) pairs for the aggregator
    balance: str = "none"
    diagnostics_every: int = 0

    @property
    def per_task_every_step(self) -> bool:
        return self.aggregator != "sum" or self.balance != "none"


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RunConfig:
    """What every training script shares; each script's config extends it."""
    option: str = field(default="finetune", metadata=_help(
        "pretrain: encoder frozen, heads trained; finetune: everything trains",
        choices=list(OPTIONS)))
    mode: str = field(default="mix", metadata=_help(
        "seq: a full pass per task in turn; mix: each step one batch of every task",
        choices=list(MODES)))
    seq_order: str = field(default="", metadata=_help(
        "task order of a seq epoch (comma-separated; empty: the tasks' order)"))
    epochs: int = 3
    lr: float = field(default=0.0, metadata=_help("0: 1e-3 for pretrain, 1e-5 for finetune"))
    head_lr: float = field(default=0.0, metadata=_help(
        "learning rate of the task heads; 0: the same as --lr"))
    weight_decay: float = 0.0
    scheduler: str = field(default="constant", metadata=_help(
        "learning-rate schedule after warmup", choices=list(SCHEDULERS)))
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
    freeze_word_embeddings: bool = field(default=False, metadata=_help(
        "keep the encoder's word embedding (vocabulary x hidden, half of MiniLM's "
        "parameters) at its pretrained values: no gradient and no optimizer update for it"))
    layer_decay: float = field(default=1.0, metadata=_help(
        "layer-wise lr decay D in (0, 1] (ELECTRA, BEiT): encoder layer l of L gets lr * "
        "D^(L - l), the embeddings lr * D^L, the pooler and the heads the head lr; 1: off. "
        "Costs nothing (one optimizer group per layer)"))
    pooling: str = field(default="mean", metadata=_help(
        "sentence vector for the linear heads", choices=list(POOLINGS)))
    bucket: bool = field(default=True, metadata=_help("length-bucketed training batches"))
    ema: float = field(default=0.0, metadata=_help(
        "keep an exponential moving average of the trainable weights with this decay (e.g. "
        "0.999; warmed up as min(decay, (1 + n) / (10 + n)) at update n), evaluate it beside "
        "the live weights each epoch and keep whichever is better as best.pt (0: off)"))
    run_dir: str = field(default="", metadata=_help("output folder (default runs/<name>-<time>)"))
    progress: bool = field(default=True, metadata=_help("tqdm progress bars"))
    precision: str = field(default="fp32", metadata=_help(
        "bf16: bfloat16 autocast; fp16: float16 autocast with loss scaling (GPUs); auto: bf16 "
        "where the hardware computes it natively, else fp16 on a GPU, fp32 on a CPU",
        choices=list(PRECISIONS)))
    packed: bool = field(default=True, metadata=_help(
        "one encoder pass per training step for all its tasks' sequences, padding removed "
        "from the token-wise layers (equal to one pass per task up to float rounding); "
        "--no-packed: one padded pass per task"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the training forward (encoder, heads, losses; inductor, dynamic "
        "shapes; engine/compiling.py). Costs compile time: the first steps, and each new "
        "kind of step (seq: each task), wait for it (minutes on a small CPU). Off by default "
        "until measured (python -m bench.mix --compile); evaluation stays eager"))
    compile_mode: str = field(default="default", metadata=_help(
        "inductor's mode with --compile: reduce-overhead adds CUDA graphs (GPU runs only), "
        "max-autotune tunes the GEMM kernels (a longer compile)", choices=list(COMPILE_MODES)))
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
    # Stored resolved, so that --resume, --config, --eval_only, predict.py and export.py
    # read a run's files from any folder.
    paths: ClassVar[tuple[str, ...]] = ("checkpoint", "data_dir")
    # [low, high) of every int option (high None: no bound), checked by cli.check_ranges
    INT_RANGES: ClassVar[dict] = {"epochs": (1, None), "seed": SEED_RANGE, "max_length": (4, None),
                                  "grad_accumulation": (1, None), "save_every_steps": (0, None),
                                  "log_every_steps": (0, None)}

    def __post_init__(self) -> None:
        for name in self.paths:
            if getattr(self, name):
                setattr(self, name, os.path.abspath(getattr(self, name)))
        if not self.lr:
            self.lr = 1e-3 if self.option == "pretrain" else 1e-5
        self.check_number("lr", self.lr, low=0.0, low_open=True)
        self.check_number("head_lr", self.head_lr, low=0.0)
        self.check_number("weight_decay", self.weight_decay, low=0.0)
        self.check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        self.check_number("hidden_dropout_prob", self.hidden_dropout_prob, low=0.0, high=1.0)
        if not 0.0 < self.layer_decay <= 1.0:  # also refuses NaN
            raise ConfigError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        self.check_number("ema", self.ema, low=0.0, high=1.0)
        check_ranges(self)  # max_length >= 4: [CLS] a [SEP] b [SEP]
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"--compile_mode {self.compile_mode} needs --compile")

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

    def combination(self) -> Combination:
        """One task (or none to combine): the plain summed backward, no diagnostics."""
        return Combination()

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: dict, **changes) -> "RunConfig":
        """A config as a run saved it; keys of other versions are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**saved, **changes}.items() if k in known})


@dataclass
class MultitaskConfig(RunConfig):
    aggregator: str = field(default="sum", metadata=_help(
        "how the tasks' encoder gradients combine each mix step (aggregators.py)",
        choices=list(AGGREGATORS)))
    pcgrad: bool = field(default=False, metadata=_help("PCGrad gradient surgery: --aggregator pcgrad"))
    pcgrad_reduction: str = field(default="sum", metadata=_help(
        "combine projected gradients by sum (the paper) or mean", choices=list(PCGRAD_REDUCTIONS)))
    cagrad_c: float = field(default=0.4, metadata=_help("CAGrad's c (the radius of its ball)"))
    fairgrad_alpha: float = field(default=1.0, metadata=_help(
        "FairGrad's alpha (> 0): 1 proportional fairness, larger towards max-min fairness"))
    gradvac_beta: float = field(default=0.01, metadata=_help(
        "GradVac's EMA rate of its target cosines, in [0, 1) (0: PCGrad)"))
    smooth_weights: float = field(default=0.0, metadata=_help(
        "CR-MOGM: average the aggregator's weights over the steps, w = BETA w_prev + "
        "(1 - BETA) w_new, BETA in [0, 1) (0: off)"))
    balance: str = field(default="none", metadata=_help(
        "loss balancing before the aggregator (balancing.py); grad_norm equalises the tasks' "
        "encoder gradient norms", choices=list(BALANCERS)))
    aux: str = field(default="", metadata=_help("auxiliary 5-class sentiment file (e.g. Yelp)"))
    paths: ClassVar[tuple[str, ...]] = RunConfig.paths + ("aux",)
    tasks: str = field(default=",".join(TASK_NAMES), metadata=_help(
        "the evaluated tasks to train (comma-separated, any order), e.g. quora alone for a "
        "single-task baseline"))
    quora_encoding: str = field(default="cross", metadata=_help(
        "cross: the pair as one input; bi: each sentence alone; both: a cross and a bi head, "
        "trained on the mean of their losses, predicting from the mean of their probabilities",
        choices=list(ENCODINGS)))
    sts_encoding: str = field(default="bi", metadata=_help(
        "cross: the pair as one input; bi: cosine of the two sentences; both: a cross and a bi "
        "head, trained on the mean of their losses, predicting the mean of their scores",
        choices=list(ENCODINGS)))
    seq_order: str = field(default=",".join(("quora", "sst", "sts")), metadata=_help(
        "task order of a seq epoch (comma-separated; an auxiliary task goes last)"))
    batch_size_sst: int = 8
    batch_size_quora: int = 16
    batch_size_sts: int = 6
    batch_size_aux: int = 4
    weight_sst: float = 1.0
    weight_quora: float = 1.0
    weight_sts: float = 1.0
    weight_aux: float = 1.0
    rdrop: float = field(default=0.0, metadata=_help(
        "R-Drop's alpha (0: off): each chosen task's batch runs twice with independent "
        "dropout; its loss is the mean of the two losses + alpha * the symmetric KL of the two "
        "predicted distributions (SST, aux; Quora as Bernoulli) or alpha * the MSE of the two "
        "predicted scores (STS). Costs a second forward and backward over the chosen tasks' "
        "sequences: about their share of a step's tokens extra (default batch sizes, full "
        "data: SST 23%%, Quora 57%%, STS 20%%; all three: 2x)"))
    rdrop_tasks: str = field(default="", metadata=_help(
        "the tasks R-Drop applies to (comma-separated; empty: every trained task, aux "
        "included)"))
    sts_loss: str = field(default="mse", metadata=_help(
        "the STS training loss: mse (today's: the predicted score against the 0-5 label) or "
        "cosent (CoSENT: "
        "log(1 + sum over the batch's pairs i, j with label_i > label_j of "
        "exp(20 (cos_j - cos_i))), a ranking loss; needs --sts_encoding bi). Predictions "
        "stay 5 cos clamped to [0, 5]. Costs nothing measurable", choices=list(STS_LOSSES)))
    label_smoothing: float = field(default=0.0, metadata=_help(
        "label smoothing eps in [0, 1) of the classification losses of "
        "--label_smoothing_tasks (Quora's one-logit loss: target y (1 - eps) + eps / 2, "
        "the same as 2-class smoothing); 0: off. Costs nothing"))
    label_smoothing_tasks: str = field(default="sst", metadata=_help(
        "the tasks --label_smoothing applies to (comma-separated, of sst, quora, aux; "
        "empty: every trained one of them)"))
    subsample: int = field(default=0, metadata=_help(
        "train on at most N examples per task (0: all), for quick budgets"))
    subsample_fraction: float = field(default=0.0, metadata=_help(
        "train on this fraction of each task's examples (0: all): sizes stay proportional"))
    sampling: str = field(default="cycle", metadata=_help(
        "how a mix step splits its examples among the tasks (engine/task_mixing.py). cycle: "
        "one batch of every task of its --batch_size_*, an epoch as long as the largest task "
        "in batches; temperature: task k gets a share p_k ~ n_k^(1/T) of "
        "--sampling_batch_size examples (n_k: its training examples), at least one; "
        "annealed: p_k ~ n_k^alpha, alpha from 1 down to 0.2 over the epochs (Stickland & "
        "Murray 2019). Sampled epochs hold about as many examples as the data",
        choices=list(SAMPLINGS)))
    sampling_temperature: str = field(default="2", metadata=_help(
        "T of --sampling temperature: 1 proportional to the task sizes, 2 square-root "
        "sampling, inf uniform"))
    sampling_batch_size: int = field(default=0, metadata=_help(
        "examples of a sampled mix step, per process and micro-batch (0: the sum of the "
        "tasks' batch sizes, so a step costs about what a cycle step costs)"))
    grad_diagnostics: bool = field(default=True, metadata=_help(
        "per-epoch cosine and conflict rate between task gradients (mix mode)"))
    grad_diagnostics_every: int = field(default=10, metadata=_help(
        "compute the gradient diagnostics on every Nth mix step only (steps N, 2N, ...): "
        "they need each task's gradient apart, which costs ~15%% of a step on a CPU, so "
        "the epoch means are taken over the sampled steps (1: every step). Aggregators "
        "and balancings need the task gradients, and compute them, every step"))
    eval_only: bool = field(default=False, metadata=_help(
        "evaluate and predict from --load (its saved config wins over training flags)"))
    load: str = field(default="", metadata=_help(
        "a best.pt checkpoint, for --eval_only; several (the flag repeated, or one "
        "comma-separated list): an ensemble, their probabilities or scores averaged",
        repeatable=True))
    label: str = field(default="", metadata=_help(
        "the name of this run's configuration in report.py's tables and figures (runs with "
        "one label are one row, e.g. its seeds); empty: named from the settings. grid.py "
        "--rows FILE gives each run its row's name"))

    INT_RANGES: ClassVar[dict] = {
        **RunConfig.INT_RANGES, "subsample": (0, None), "grad_diagnostics_every": (1, None),
        "sampling_batch_size": (0, None),
        **{f"batch_size_{name}": (1, None) for name in TASK_NAMES + (AUX.name,)}}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_multitask(self)

    @property
    def task_names(self) -> tuple[str, ...]:
        return canonical_tasks(self.tasks.split(","))

    @property
    def trained_task_names(self) -> tuple[str, ...]:
        return self.task_names + ((AUX.name,) if self.aux else ())

    @property
    def rdrop_task_names(self) -> tuple[str, ...]:
        """The tasks R-Drop applies to (none when off; all trained ones when unlisted)."""
        return (self.listed("rdrop_tasks") or self.trained_task_names) if self.rdrop else ()

    @property
    def smoothed_task_names(self) -> tuple[str, ...]:
        """The tasks label smoothing applies to (none when off; all trained classification
        ones when unlisted)."""
        every = tuple(n for n in self.trained_task_names if n != "sts")
        return (self.listed("label_smoothing_tasks") or every) if self.label_smoothing else ()

    def listed(self, flag: str) -> tuple[str, ...]:
        return tuple(getattr(self, flag).split(",")) if getattr(self, flag) else ()

    @property
    def loads(self) -> list[str]:
        """--load's checkpoints: one, or an ensemble's members."""
        return repeated("load", self.load) if self.load else []

    @property
    def all_task_names(self) -> tuple[str, ...]:
        return TASK_NAMES + (AUX.name,)

    def batch_size(self, task: str) -> int:
        return getattr(self, f"batch_size_{task}")

    def weight(self, task: str) -> float:
        return getattr(self, f"weight_{task}")

    def encoding(self, task: str) -> str:
        return getattr(self, f"{task}_encoding", "cross")

    def combination(self) -> Combination:
        options = {"pcgrad": {"reduction": self.pcgrad_reduction},
                   "cagrad": {"c": self.cagrad_c}, "fairgrad": {"alpha": self.fairgrad_alpha},
                   "gradvac": {"beta": self.gradvac_beta}}.get(self.aggregator, {})
        if self.smooth_weights:
            options = {**options, "smooth": self.smooth_weights}
        return Combination(self.aggregator, tuple(options.items()), self.balance,
                           self.grad_diagnostics_every if self.grad_diagnostics else 0)

    def run_name(self) -> str:
        name = "pretrain" if self.option == "pretrain" else f"finetune-{self.mode}"
        name += "" if self.aggregator == "sum" else f"-{self.aggregator}"
        name += "" if self.balance == "none" else f"-{self.balance}"
        name += "-aux" if self.aux else ""
        name += "" if self.sampling == "cycle" else f"-{self.sampling}"
        name += "" if self.task_names == TASK_NAMES else "-" + "-".join(self.task_names)
        return f"{name}-{self.hidden_dropout_prob:g}"



@dataclass
class ClassifierConfig(RunConfig):
    task: str = field(default="sst", metadata={"help": "dataset", "choices": list(CLASSIFIER_TASKS)})
    option: str = field(default="pretrain", metadata={
        "help": "pretrain: encoder frozen; finetune: everything trains",
        "choices": list(OPTIONS)})
    batch_size: int = 8
    INT_RANGES: ClassVar[dict] = {**RunConfig.INT_RANGES, "batch_size": (1, None)}

    def run_name(self) -> str:
        return f"{self.option}-{self.task}"


