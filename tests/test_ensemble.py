"""Ensembles: several --load checkpoints (predict.py, multitask_classifier.py --eval_only)
predict from their averaged probabilities (classification: softmax; quora: sigmoid) or
scores (sts)."""
import json
import os

import pytest
import torch

import multitask_classifier as mtc
import predict
from engine import ensemble
from engine.cli import explicit_options, parse_config
from engine.configs import MultitaskConfig
from engine.errors import CheckpointError, ConfigError
from engine.tasks import read_split, split_path
from evaluation import outputs, read_predictions

from test_predict import dev_input
from test_training import run_args


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tiny_data, tmp_path_factory):
    """Three tiny runs: a; b, of another seed and other pair encodings; c, without sts."""
    root = tmp_path_factory.mktemp("ensemble")
    flags = {"a": [], "b": ["--seed", "2", "--quora_encoding", "bi", "--sts_encoding", "cross"],
             "c": ["--tasks", "sst,quora"]}
    return {name: os.path.join(mtc.main(run_args(tiny_checkpoint, tiny_data, root / name,
                                                 "--epochs", "1", *extra)), "best.pt")
            for name, extra in flags.items()}


def evaluate(tiny_data, run_dir, *loads):
    return mtc.main(["--eval_only", *(a for path in loads for a in ("--load", path)),
                     "--data_dir", tiny_data, "--run_dir", str(run_dir)])


def predictions(folder):
    found = sorted(os.listdir(os.path.join(folder, "predictions")))
    return {name: read_predictions(os.path.join(folder, "predictions", name)) for name in found}


def predict_lines(loads, task, path):
    return predict.main([*(a for load in loads for a in ("--load", load)), "--task", task,
                         "--input", str(path)])


def test_a_checkpoint_with_itself_predicts_as_it_does_alone(runs, tiny_data, tmp_path):
    single = evaluate(tiny_data, tmp_path / "single", runs["a"])
    double = evaluate(tiny_data, tmp_path / "double", runs["a"], runs["a"])
    assert len(predictions(single)) == 5 and predictions(double) == predictions(single)
    record = json.load(open(os.path.join(double, "ensemble.json")))
    assert record["members"] == [runs["a"], runs["a"]]
    summary = json.load(open(os.path.join(os.path.dirname(runs["a"]), "summary.json")))
    assert {**record["dev"], "overall": record["overall"]} == summary["best"]
    assert not os.path.exists(os.path.join(single, "ensemble.json"))  # one --load: as before
    for task in ("sst", "quora", "sts"):
        dev_input(tiny_data, task, tmp_path / f"{task}.txt")
        assert predict_lines([runs["a"]] * 2, task, tmp_path / f"{task}.txt") == \
            predict_lines([runs["a"]], task, tmp_path / f"{task}.txt")


def test_two_checkpoints_predict_from_the_mean_of_their_probabilities(runs, tiny_data, tmp_path):
    folder = evaluate(tiny_data, tmp_path / "ens", runs["a"], runs["b"])
    found = predictions(folder)
    device = torch.device("cpu")
    for task_name in ("sst", "quora", "sts"):
        members = [predict.load_model(runs[m], task_name, device) for m in ("a", "b")]
        for _, task in members:  # predict.py's models read no data: give them the dev set
            task.dev = read_split(task.spec, split_path(task.spec, tiny_data, "dev"))
        ids, a, _ = outputs(*members[0], "dev", device)
        _, b, _ = outputs(*members[1], "dev", device)
        assert not torch.equal(a, b)  # two different members
        mean = {"sst": lambda x: torch.softmax(x, -1), "quora": torch.sigmoid,
                "sts": lambda x: x}[task_name]
        probability = (mean(a) + mean(b)) / 2
        _, output, _ = ensemble.averaged([ensemble.Member(m, model, {task_name: task})
                                          for m, (model, task) in zip("ab", members)],
                                         task_name, "dev", device)
        torch.testing.assert_close(mean(output).float(), probability, atol=1e-6, rtol=1e-6)
        if task_name == "sst":
            expected = probability.argmax(-1).tolist()
        elif task_name == "quora":
            expected = (probability > 0.5).long().tolist()
        else:
            expected = [f"{v:.4f}" for v in probability.clamp(0, 5).tolist()]
        got = found[f"{task_name}-dev-output.csv"]
        assert [got[i] for i in ids] == [str(v) for v in expected], task_name
    # predict.py's detail: the mean probability (quora), the mean raw score (sts)
    for task in ("quora", "sts"):
        dev_input(tiny_data, task, tmp_path / f"{task}.txt")
        alone = [predict_lines([runs[m]], task, tmp_path / f"{task}.txt") for m in ("a", "b")]
        both = predict_lines([runs["a"], runs["b"]], task, tmp_path / f"{task}.txt")
        for x, y, mean in zip(*alone, both):
            detail = (float(x.split("\t")[1]) + float(y.split("\t")[1])) / 2
            assert float(mean.split("\t")[1]) == pytest.approx(detail, abs=1.5e-4)


def test_members_with_other_tasks_are_refused_by_name(runs, tiny_data, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="do not agree on their tasks") as err:
        evaluate(tiny_data, tmp_path / "ens", runs["a"], runs["c"])
    assert runs["a"] in str(err.value) and runs["c"] in str(err.value)
    assert not os.path.exists(tmp_path / "ens")  # refused before any folder is made
    dev_input(tiny_data, "sts", tmp_path / "in.txt")
    with pytest.raises(CheckpointError, match=f"{runs['c']} has no sts head"):
        predict_lines([runs["a"], runs["c"]], "sts", tmp_path / "in.txt")
    # a task both have: fine
    dev_input(tiny_data, "quora", tmp_path / "quora.txt")
    assert len(predict_lines([runs["a"], runs["c"]], "quora", tmp_path / "quora.txt")) == 24


def test_load_repeats_or_takes_a_list():
    assert parse_config(MultitaskConfig, ["--load", "a.pt", "--load", "b.pt"]).load == "a.pt,b.pt"
    assert parse_config(MultitaskConfig, ["--load", "a.pt,b.pt"]).loads == ["a.pt", "b.pt"]
    assert explicit_options(MultitaskConfig, ["--load", "a", "--load", "b"]) == {"load": "a,b"}
    assert parse_config(predict.PredictConfig, ["--load", "a", "--load", "b"]).load == "a,b"
    # a saved config holds one string (an older run's, or a new one's)
    assert MultitaskConfig.from_saved({"load": "runs/x/best.pt"}).loads == ["runs/x/best.pt"]
    assert MultitaskConfig.from_saved({}).loads == []
    for argv in (["--load", "a,,b"], ["--load", "a", "--load", ""]):
        with pytest.raises(ConfigError, match="--load .*an empty path"):
            parse_config(MultitaskConfig, argv)
