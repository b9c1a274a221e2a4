import os

import pytest

from engine.cli import parse_config
from engine.errors import ConfigError
from multitask_classifier import MultitaskConfig


def test_defaults_and_derived_lr():
    cfg = parse_config(MultitaskConfig, [])
    assert (cfg.option, cfg.mode, cfg.pcgrad, cfg.lr) == ("finetune", "mix", False, 1e-5)
    assert parse_config(MultitaskConfig, ["--option", "pretrain"]).lr == 1e-3
    assert parse_config(MultitaskConfig, ["--option", "pretrain", "--lr", "0.5"]).lr == 0.5


def test_flags_and_types():
    cfg = parse_config(MultitaskConfig, ["--pcgrad", "--no-bucket", "--epochs", "2",
                                         "--hidden_dropout_prob", "0.5", "--aux", "y.csv"])
    assert cfg.pcgrad and not cfg.bucket and cfg.epochs == 2
    assert cfg.hidden_dropout_prob == 0.5 and cfg.aux == os.path.abspath("y.csv")  # stored resolved
    assert cfg.run_name() == "finetune-mix-pcgrad-aux-0.5"
    assert parse_config(MultitaskConfig, ["--tasks", "quora"]).run_name() == "finetune-mix-quora-0.3"


def test_bad_choice_exits(capsys):
    with pytest.raises(SystemExit):
        parse_config(MultitaskConfig, ["--mode", "parallel"])
    assert "invalid choice" in capsys.readouterr().err


def test_inconsistent_options():
    with pytest.raises(ConfigError, match="--pcgrad needs --mode mix"):
        parse_config(MultitaskConfig, ["--mode", "seq", "--pcgrad"])
    with pytest.raises(ConfigError, match="--epochs must be positive"):
        parse_config(MultitaskConfig, ["--epochs", "0"])
    with pytest.raises(ConfigError, match="--seq_order must name"):
        parse_config(MultitaskConfig, ["--seq_order", "sst,sts"])
    with pytest.raises(ConfigError, match="--tasks must name"):
        parse_config(MultitaskConfig, ["--tasks", "quora,qnli"])
    with pytest.raises(ConfigError, match="--tasks must name"):
        parse_config(MultitaskConfig, ["--tasks", "sts,sts"])
    with pytest.raises(ConfigError, match="--eval_only needs --load"):
        parse_config(MultitaskConfig, ["--eval_only"])
    with pytest.raises(ConfigError, match="--grad_diagnostics_every must be positive"):
        parse_config(MultitaskConfig, ["--grad_diagnostics_every", "0"])


def test_positional_field_is_optional_and_typed():
    from dataclasses import dataclass, field

    @dataclass
    class Options:
        root: str = field(default="runs", metadata={"positional": True})
        count: int = 1

    assert parse_config(Options, []) == Options("runs", 1)
    assert parse_config(Options, ["elsewhere", "--count", "3"]) == Options("elsewhere", 3)


def test_the_name_lists_are_the_registries():
    """engine/names.py (torch-free, read by every CLI and the analysis tools) names exactly
    what the registries implement, in the same order."""
    from engine import names
    from engine.aggregators import AGGREGATORS
    from engine.balancing import BALANCERS
    from engine.heads import POOLING_TEXT
    from engine.precision import DTYPES
    assert tuple(AGGREGATORS) == names.AGGREGATORS
    assert tuple(BALANCERS) == names.BALANCERS
    assert tuple(POOLING_TEXT) == names.POOLINGS
    assert tuple(DTYPES) + ("auto",) == names.PRECISIONS


def test_configs_are_typed_and_torch_free():
    """mode and seq_order are fields of the shared RunConfig (no class-level shims), and the
    configs import without torch, so grid.py and the analysis tools read them cheaply."""
    import subprocess
    import sys
    from dataclasses import fields
    from engine.configs import ClassifierConfig, RunConfig
    shared = {f.name for f in fields(RunConfig)}
    assert {"mode", "seq_order"} <= shared
    assert ClassifierConfig().combination().aggregator == "sum"
    code = "import sys, engine.configs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
