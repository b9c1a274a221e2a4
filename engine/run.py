"""The one run path of both scripts: the functions that train from a config (seed ->
device -> checkpoint folder -> tokenizer and encoder -> tasks -> model -> the run's parts
(engine/build.py) -> run folder -> fit -> summary) and rebuild a trained model from its
best.pt."""
from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from base_bert import default_checkpoint_path, from_pretrained
from bert import BertModel
from config import BertConfig
from engine.build import build_parts
from engine.configs import RunConfig
from engine.distributed import Dist, barrier, broadcast_object, init_distributed, on_main, shutdown
from engine.errors import CheckpointError, ConfigError, ReportedElsewhere, UserError
from engine.fingerprint import FINGERPRINT, check_unchanged, fingerprint
from engine.heads import MultitaskBERT
from engine.paths import check_kind
from engine.precision import Precision
from engine.runfiles import CONFIG_FILE, LAST_FILE, SUMMARY_FILE, check_output, read_json
from engine.runlock import claim_run_dir, claim_training_dir
from engine.steplog import require_tensorboard
from engine.tasks import SPLITS, Task
from engine.trainer import Trainer
from evaluation import Predictions, dev_scores, predict_all
from tokenizer import BertTokenizer
from utils import choose_device, load_checkpoint, seed_everything

# (config, tokenizer, encoder config, splits to read) -> the script's tasks, heads fresh
MakeTasks = Callable[["RunConfig", BertTokenizer, BertConfig, tuple], list[Task]]
SAVED_KEYS = ("model", "config", "bert_config")
SCRIPT_FILES = {"classifier": "classifier.py", "multitask": "multitask_classifier.py"}


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
                         Precision.resolve(cfg.precision, device))


def train(cfg: RunConfig, script: str, make_tasks: MakeTasks, name: str,
          log: Callable[[str], None] = print) -> tuple[str, dict, list[Task]]:
    """Train from a config (or continue the run in cfg.resume); returns the run folder,
    the summary and the tasks. Under torchrun: one process per rank, data-parallel."""
    dist = init_distributed(cfg.use_gpu)
    try:
        result = _train(cfg, script, make_tasks, name, dist, log if dist.is_main else lambda *_: None)
        barrier()  # leave together: a rank tearing gloo down while rank 0 still writes can abort
        return result
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
    parts = build_parts(cfg, build_model(cfg, s.encoder, tasks, s.device), tasks, dist)
    # Only rank 0 makes, locks (for the run's whole life) and writes the folder.
    saved_config = {**cfg.as_dict(), "world_size": dist.world_size}  # config.json
    claim = claim_training_dir(
        cfg.resume, cfg.run_dir, os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"),
        saved_config,
        reads=(s.folder, cfg.data_dir, cfg.config, getattr(cfg, "aux", ""))
    ) if dist.is_main else None
    with claimed(dist, claim) as run_dir:
        log(f"{'resuming ' if cfg.resume else ''}{name} on {s.device}{parts.precision.describe()}"
            f"{f' x {dist.world_size} processes' if dist.enabled else ''}: checkpoint {s.folder}")
        for task in tasks:
            log(f"  {task.name}: {len(task.train)} train, {len(task.dev)} dev, {len(task.test)} "
                f"test, batch {global_batch(task.batch_size, cfg, dist)}")
        if parts.mixer is not None:
            log(parts.mixer.describe([t.name for t in tasks]))
        extra = {"script": script, "config": cfg.as_dict(), "bert_config": asdict(s.encoder.config),
                 "tokenizer": s.tokenizer.state_dict(),  # best.pt needs no checkpoint folder
                 FINGERPRINT: fingerprint(saved_config, {t.name: t.train_file for t in tasks})}
        summary = Trainer(parts, cfg, dist, run_dir, extra, log).fit(resume=bool(cfg.resume))
    return run_dir, summary, tasks


@contextmanager
def claimed(dist: Dist, claim) -> Iterator[str]:
    """Rank 0 enters `claim` (the run folder, made and locked); every rank gets its name.
    A refusal there stops every rank at once: rank 0 names it, the others exit quietly."""
    with ExitStack() as stack:
        run_dir, message = "", None
        if dist.is_main:
            try:
                run_dir = stack.enter_context(claim)
            except UserError as err:
                message = str(err)
                error = err
        run_dir, message = broadcast_object((run_dir, message))
        if message is not None:
            raise (error if dist.is_main else ReportedElsewhere(message))
        yield run_dir


def global_batch(batch_size: int, cfg: RunConfig, dist: Dist) -> str:
    parts = [str(batch_size)] + [f"{n} {what}" for n, what in
                                 ((cfg.grad_accumulation, "micro-batches"),
                                  (dist.world_size, "processes")) if n > 1]
    total = batch_size * cfg.grad_accumulation * dist.world_size
    return " x ".join(parts) + (f" = {total}" if total != batch_size else "")


# Flags that change nothing a resumed run computes.
HARMLESS_ON_RESUME = ("resume", "progress", "save_every_steps")


def resume_config(cls, given: dict, script: str) -> RunConfig:
    """The saved configuration of the run in --resume; a flag that would change the result
    is refused (a resumed run equals an uninterrupted one), and so is a run of another
    script, or one whose config.json or training files changed since its last save."""
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
    made_by = saved_script({"config": saved})
    if made_by != script:
        made = SCRIPT_FILES.get(made_by, made_by)
        raise ConfigError(f"--resume {folder}: a run of {made}, not of {SCRIPT_FILES[script]}; "
                          f"continue it with {made} --resume {folder}")
    cfg = cls.from_saved(saved, **{k: v for k, v in given.items() if k in HARMLESS_ON_RESUME})
    # as _train records it: the settings the run will use (paths resolved, unknown keys dropped)
    now = {**cfg.as_dict(), "world_size": saved.get("world_size", 1)}
    recorded = load_checkpoint(os.path.join(folder, LAST_FILE), mmap=True).get(FINGERPRINT)
    if recorded:  # a setting the run predates counts as its default, as grid.py reads it
        recorded = {**recorded, "config": {**cls.from_saved(recorded["config"]).as_dict(),
                                           "world_size": recorded["config"].get("world_size", 1)}}
    check_unchanged(folder, recorded, now, HARMLESS_ON_RESUME)
    return cfg


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
                              f"(use {SCRIPT_FILES[found]})" if found in SCRIPT_FILES
                              else f"{path}: unknown kind of checkpoint {found!r}")
    return saved


def rebuild(saved: dict, cfg: RunConfig, make_tasks: MakeTasks, splits: tuple,
            device: torch.device, source: str) -> tuple[MultitaskBERT, list[Task]]:
    """The model a checkpoint was trained as, its weights loaded strictly, with the tasks
    of `splits` (no training file is read for evaluation)."""
    bert_config = BertConfig(**saved["bert_config"])
    check_max_length(cfg, bert_config)
    tasks = make_tasks(cfg, saved_tokenizer(saved, cfg, source), bert_config, splits)
    model = build_model(cfg, BertModel(bert_config), tasks, device)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{source}: its tensors do not fit the model of its own "
                              f"config ({str(err).splitlines()[0]})") from None
    return model.to(device), tasks


def saved_tokenizer(saved: dict, cfg: RunConfig, source: str) -> BertTokenizer:
    """The checkpoint's own copy of its tokenizer; one saved before it kept a copy reads its
    checkpoint folder."""
    if "tokenizer" in saved:
        return BertTokenizer.from_state_dict(saved["tokenizer"], cfg.max_length, source)
    return BertTokenizer.from_pretrained(cfg.checkpoint or default_checkpoint_path(), cfg.max_length)


def evaluation_dir(load: str, run_dir: str, reads: tuple = (), name: str = "eval"):
    """Where --eval_only writes, claimed while it does (claim_run_dir): never over a run, an
    earlier evaluation or what it reads; by default LOAD's folder/eval (`name`), else
    eval-2, ..."""
    default = os.path.join(os.path.dirname(os.path.abspath(load)), name)
    return claim_run_dir("--run_dir", run_dir, default,
                         lambda folder: check_output("--run_dir", folder, (load, *reads)))


def evaluate_saved(load: str, cfg: RunConfig, make_tasks: MakeTasks, saved: dict,
                   run_dir: str, device: torch.device) -> tuple[list[Predictions], dict]:
    """--eval_only: predictions of every evaluated task on dev and test, written to
    `run_dir`; returns them and the dev scores."""
    model, tasks = rebuild(saved, cfg, make_tasks, ("dev", "test"), device, load)
    predictions = predict_all(model, tasks, device, ("dev", "test"))
    for p in predictions:
        p.write(run_dir)
    return predictions, dev_scores(predictions)

