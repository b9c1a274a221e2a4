"""The checks of MultitaskConfig that span several options (engine/configs.py checks each
number's own range): which aggregators, balancings and losses go together, and which tasks
an option may name. Each refusal is one ConfigError naming the flags."""
from __future__ import annotations

from engine.cli import repeated
from engine.errors import ConfigError
from engine.paths import check_kind
from engine.specs import TASK_NAMES
from engine.task_mixing import check_sampling


def check_multitask(cfg) -> None:
    """Every cross-option rule of a MultitaskConfig (called from its __post_init__); may
    set --pcgrad and --aggregator pcgrad to each other."""
    cfg.check_number("cagrad_c", cfg.cagrad_c, low=0.0)
    cfg.check_number("fairgrad_alpha", cfg.fairgrad_alpha, low=0.0, low_open=True)
    cfg.check_number("gradvac_beta", cfg.gradvac_beta, low=0.0, high=1.0)
    cfg.check_number("smooth_weights", cfg.smooth_weights, low=0.0, high=1.0)
    check_kind("--aux", cfg.aux, "file")
    cfg.check_number("subsample_fraction", cfg.subsample_fraction, low=0.0, high=1.0)
    if cfg.subsample and cfg.subsample_fraction:
        raise ConfigError("--subsample and --subsample_fraction: give one (a cap or a fraction)")
    if cfg.pcgrad and cfg.aggregator not in ("sum", "pcgrad"):
        raise ConfigError(f"--pcgrad is --aggregator pcgrad; it contradicts --aggregator {cfg.aggregator}")
    if cfg.pcgrad or cfg.aggregator == "pcgrad":
        cfg.pcgrad, cfg.aggregator = True, "pcgrad"
    if cfg.pcgrad and cfg.mode != "mix":
        raise ConfigError("--pcgrad needs --mode mix (one batch of every task per step)")
    if (cfg.aggregator != "sum" or cfg.balance != "none") and cfg.mode != "mix":
        raise ConfigError("--aggregator and --balance need --mode mix (one batch of every task per step)")
    if cfg.eval_only and not cfg.load:
        raise ConfigError("--eval_only needs --load CHECKPOINT")
    if cfg.load:
        repeated("load", cfg.load)  # an empty path in the list: refused here
    chosen = cfg.tasks.split(",")
    if not set(chosen) <= set(TASK_NAMES) or len(set(chosen)) < len(chosen):
        raise ConfigError(f"--tasks must name some of {', '.join(TASK_NAMES)}, each once, "
                          f"got {cfg.tasks!r}")
    if sorted(cfg.seq_order.split(",")) != sorted(TASK_NAMES):
        raise ConfigError(f"--seq_order must name {', '.join(TASK_NAMES)} once each, "
                          f"got {cfg.seq_order!r}")
    for name in cfg.all_task_names:
        cfg.check_number(f"weight_{name}", cfg.weight(name), low=0.0)
    check_loss_options(cfg)
    check_sampling(cfg.sampling, cfg.mode, cfg.sampling_temperature)
    trained = cfg.trained_task_names
    if cfg.balance == "famo" and not all(cfg.weight(name) > 0 for name in trained):
        raise ConfigError("--balance famo divides by each trained task's loss: every "
                          "--weight_<task> of --tasks (and aux) must be > 0")


def check_loss_options(cfg) -> None:
    """--rdrop, --sts_loss, --label_smoothing: each names only tasks it can act on."""
    cfg.check_number("rdrop", cfg.rdrop, low=0.0)
    cfg.check_number("label_smoothing", cfg.label_smoothing, low=0.0, high=1.0)
    trained = cfg.trained_task_names
    for flag, on in (("rdrop_tasks", cfg.rdrop), ("label_smoothing_tasks", cfg.label_smoothing)):
        # an option that is off may name a task this run lacks, not a task that is none
        known = trained if on else cfg.all_task_names
        wrong = [n for n in cfg.listed(flag) if n not in known]
        if wrong:
            raise ConfigError(f"--{flag} names {', '.join(wrong)}, not among the "
                              f"{'trained ' if on else ''}tasks ({', '.join(known)})")
    if "sts" in cfg.smoothed_task_names:
        raise ConfigError("--label_smoothing_tasks: sts is a regression task, it has no "
                          "class distribution to smooth")
    if cfg.sts_loss == "cosent" and (cfg.sts_encoding != "bi" or "sts" not in trained):
        raise ConfigError("--sts_loss cosent needs the STS bi-encoder (its cosine "
                          "score): --sts_encoding bi, with sts among --tasks")
