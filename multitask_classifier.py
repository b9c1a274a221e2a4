"""Multitask fine-tuning of BERT: SST-5 sentiment, Quora paraphrase, STS-B similarity
(and optionally an auxiliary Yelp sentiment task), trained four ways: pretrain (encoder
frozen), finetune-seq, finetune-mix, finetune-mix with PCGrad.

    python multitask_classifier.py --option finetune --mode mix --pcgrad
    python multitask_classifier.py --eval_only --load runs/<run>/best.pt
"""
from __future__ import annotations

import sys

from datasets import subsample, subsample_limit
from engine import ensemble, run
from engine.cli import explicit_options, parse_config, run_cli
from engine.configs import MultitaskConfig
from engine.losses import configure_losses
from engine.specs import AUX, SPECS
from engine.tasks import Task, build_task
from evaluation import format_results
from utils import choose_device

SCRIPT = "multitask"


def build_tasks(cfg: MultitaskConfig, tokenizer, bert_config, splits=run.SPLITS) -> list[Task]:
    """The chosen tasks (and the auxiliary one, for training only), heads fresh."""
    specs = [SPECS[name] for name in cfg.task_names]
    specs += [AUX] if cfg.aux else []  # its head is part of the model; its file read to train only
    tasks = [build_task(spec, cfg.data_dir, tokenizer, bert_config, cfg.batch_size(spec.name),
                        cfg.hidden_dropout_prob, cfg.pooling, cfg.encoding(spec.name), splits,
                        train_path=cfg.aux if spec is AUX else "", weight=cfg.weight(spec.name))
             for spec in specs]
    for i, task in enumerate(tasks):
        limit = subsample_limit(len(task.train), cfg.subsample, cfg.subsample_fraction)
        task.train = subsample(task.train, limit, cfg.seed + i)
    configure_losses(cfg, tasks)  # --label_smoothing, --sts_loss, --rdrop
    return tasks


def train(cfg: MultitaskConfig) -> str:
    run_dir, summary, tasks = run.train(cfg, SCRIPT, build_tasks, cfg.run_name())
    budget = (f", training subsample {cfg.subsample}" if cfg.subsample else
              f", training fraction {cfg.subsample_fraction:g}" if cfg.subsample_fraction else "")
    title = (f"dev results of {cfg.run_name()} (best epoch {summary['best_epoch']} of "
             f"{summary['epochs']}{budget})")
    scores = {k: v for k, v in summary["best"].items() if k != "overall"}
    print(format_results(scores, tasks, title) + f"\nrun folder: {run_dir}")
    return run_dir


def evaluate_checkpoint(cfg: MultitaskConfig, given: dict) -> str:
    """--eval_only: rebuild the model a checkpoint was trained as, then predict; several
    checkpoints predict as one ensemble (engine/ensemble.py)."""
    loads = cfg.loads
    saved = [run.load_saved(path, SCRIPT) for path in loads]
    ignored = sorted(set(given) - {"eval_only", "load", "data_dir", "run_dir", "use_gpu", "progress"})
    if ignored:
        print(f"note: --eval_only uses the checkpoint's own settings; ignoring "
              f"{', '.join('--' + name for name in ignored)}")
    trained = [MultitaskConfig.from_saved(s["config"], data_dir=cfg.data_dir, eval_only=False,
                                          load="", use_gpu=cfg.use_gpu) for s in saved]
    device = choose_device(cfg.use_gpu)
    members = ensemble_members(loads, trained, saved, device) if len(loads) > 1 else []
    with run.evaluation_dir(loads[0], cfg.run_dir, (*loads[1:], cfg.data_dir),
                            "ensemble" if members else "eval") as run_dir:
        if members:
            predictions, scores = ensemble.evaluate(members, run_dir, device)
        else:
            predictions, scores = run.evaluate_saved(cfg.load, trained[0], build_tasks, saved[0],
                                                     run_dir, device)
    tasks = [p.task for p in predictions]
    what = f"the ensemble of {', '.join(loads)}" if members else cfg.load
    print(format_results(scores, tasks, f"dev results of {what}") + f"\npredictions in {run_dir}")
    return run_dir


def ensemble_members(loads: list[str], trained: list[MultitaskConfig], saved: list[dict],
                     device) -> list[ensemble.Member]:
    """Each checkpoint's model and evaluated tasks, checked to agree before any folder is made."""
    members = []
    for path, cfg, checkpoint in zip(loads, trained, saved):
        model, tasks = run.rebuild(checkpoint, cfg, build_tasks, ("dev", "test"), device, path)
        members.append(ensemble.Member(path, model, {t.name: t for t in tasks if t.spec.evaluated}))
    ensemble.check_agree(members)
    return members


def main(argv: list[str] | None = None) -> str:
    """Train (or, with --eval_only, evaluate); returns the run folder."""
    cfg = parse_config(MultitaskConfig, argv, description=__doc__)
    if cfg.eval_only:
        return evaluate_checkpoint(cfg, explicit_options(MultitaskConfig, argv))
    if cfg.resume:
        cfg = run.resume_config(MultitaskConfig, explicit_options(MultitaskConfig, argv), SCRIPT)
    return train(cfg)


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
