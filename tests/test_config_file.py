"""--config RUN/config.json: a new run from a saved configuration, flags given beside it winning."""
import json
import os

import pytest

import classifier
import multitask_classifier as mtc
from engine.cli import parse_config
from engine.errors import ConfigError

from test_training import run_args


def saved_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def test_a_run_from_another_runs_config_keeps_its_settings_but_the_flags_given(
        tiny_checkpoint, tiny_data, tmp_path):
    first = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "first", "--epochs", "2",
                              "--quora_encoding", "bi", "--mode", "seq", "--subsample", "8",
                              "--tasks", "sst,sts"))
    second = mtc.main(["--config", os.path.join(first, "config.json"), "--epochs", "1",
                       "--run_dir", str(tmp_path / "second")])
    old, new = saved_config(first), saved_config(second)
    assert new["epochs"] == 1 and old["epochs"] == 2
    assert new["config"] == os.path.join(first, "config.json") and new["run_dir"] != old["run_dir"]
    differ = {k for k in old if old[k] != new[k]}
    assert differ == {"epochs", "config", "run_dir"}
    with open(os.path.join(second, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 1


def test_the_config_file_gives_no_run_dir(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"task": "cfimdb", "run_dir": "runs/old", "epochs": 7,
                                "world_size": 1}))  # a key the run wrote beside its options
    cfg = parse_config(classifier.ClassifierConfig, ["--config", str(path), "--seed", "3"])
    assert (cfg.task, cfg.epochs, cfg.seed, cfg.run_dir) == ("cfimdb", 7, 3, "")


@pytest.mark.parametrize("content, message", [
    (None, "--config .*missing.json: file not found"),
    ("{not json", "--config .*missing.json: not valid JSON"),
    ('["a list"]', "--config .*missing.json: not a config of this script"),
    ('{"mode": "mix", "tasks": "sst"}', "--config .*missing.json: not a config of this script"),
])
def test_a_bad_config_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        classifier.main(["--config", str(path)])


def test_a_classifier_config_is_not_a_multitask_one(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"task": "sst", "batch_size": 8, "epochs": 1}))
    with pytest.raises(ConfigError, match="not a config of this script"):
        mtc.main(["--config", str(path)])
