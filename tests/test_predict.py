"""predict.py: a trained run's predictions for sentences given on stdin or in a file."""
import io
import os

import pytest

import classifier
import multitask_classifier as mtc
import predict
from datasets import read_pairs, read_sentences
from engine.errors import CheckpointError, DataError
from evaluation import read_predictions
from engine.specs import SPECS

from test_training import run_args


@pytest.fixture(scope="module", params=["bi", "cross"], ids=["quora-bi", "quora-cross"])
def trained(request, tiny_checkpoint, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    return mtc.main(run_args(tiny_checkpoint, tiny_data, run_dir, "--epochs", "1",
                             "--quora_encoding", request.param))


@pytest.fixture(scope="module")
def trained_classifier(tiny_checkpoint, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clf") / "run"
    classifier.main(["--task", "cfimdb", "--checkpoint", tiny_checkpoint, "--data_dir", tiny_data,
                     "--run_dir", str(run_dir), "--epochs", "1", "--no-progress",
                     "--max_length", "64"])
    return str(run_dir)


def dev_input(data_dir, task, path):
    """The task's dev sentences as predict.py input; returns the dev ids in order."""
    spec = SPECS[task]
    reader = read_pairs if spec.pair else read_sentences
    examples = reader(os.path.join(data_dir, spec.files.format(split="dev")))
    with open(path, "w") as f:
        f.writelines("\t".join(e.texts) + "\n" for e in examples)
    return [e.id for e in examples]


def check_matches_dev(run_dir, data_dir, task, tmp_path):
    ids = dev_input(data_dir, task, tmp_path / "in.txt")
    out = tmp_path / "out.txt"
    lines = predict.main(["--load", os.path.join(run_dir, "best.pt"), "--task", task,
                          "--input", str(tmp_path / "in.txt"), "--output", str(out),
                          "--batch_size", "5"])
    assert open(out).read().splitlines() == lines
    expected = read_predictions(os.path.join(run_dir, "predictions", f"{task}-dev-output.csv"))
    assert [line.split("\t")[0] for line in lines] == [expected[i] for i in ids]
    return [line.split("\t") for line in lines]


@pytest.mark.parametrize("task", ["sst", "quora", "sts"])
def test_predictions_equal_the_runs_own_dev_predictions(trained, tiny_data, tmp_path, task):
    fields = check_matches_dev(trained, tiny_data, task, tmp_path)
    inputs = open(tmp_path / "in.txt").read().splitlines()
    assert ["\t".join(f[2:]) for f in fields] == inputs
    for f in fields:
        if task == "sst":
            assert f[1] == SPECS["sst"].label_names[int(f[0])]
        elif task == "quora":
            assert (float(f[1]) > 0.5) == (f[0] == "1")
        else:
            assert float(f[0]) == pytest.approx(min(max(float(f[1]), 0.0), 5.0), abs=1e-4)


def test_stdin_in_and_stdout_out(trained, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the movie is good .\nthe movie is bad .\n"))
    lines = predict.main(["--load", os.path.join(trained, "best.pt"), "--task", "sst"])
    assert capsys.readouterr().out.splitlines() == lines
    assert [line.split("\t")[2] for line in lines] == ["the movie is good .", "the movie is bad ."]


def test_a_classifier_checkpoint_predicts_its_task(trained_classifier, tiny_data, tmp_path):
    fields = check_matches_dev(trained_classifier, tiny_data, "cfimdb", tmp_path)
    assert {f[1] for f in fields} <= {"negative", "positive"}


def test_a_task_the_checkpoint_lacks_is_named(trained, trained_classifier):
    with pytest.raises(CheckpointError, match=r"best.pt has no cfimdb head; it has sst, quora, sts$"):
        predict.main(["--load", os.path.join(trained, "best.pt"), "--task", "cfimdb"])
    with pytest.raises(CheckpointError, match=r"has no quora head; it has cfimdb$"):
        predict.main(["--load", os.path.join(trained_classifier, "best.pt"), "--task", "quora"])


@pytest.mark.parametrize("task, text, message", [
    ("quora", "how do i cook rice ?\twhat is a cat ?\nwhat is a cat ?\n",
     r"in.txt, line 2: expected two TAB-separated sentences, got 1 field"),
    ("sst", "the movie is good .\n\nthe movie is bad .\n", r"in.txt, line 2: empty line"),
    ("sst", "the movie\tis good .\n", r"in.txt, line 1: expected one sentence \(no TAB\)"),
    ("sts", "a man plays guitar .\t \n", r"in.txt, line 1: .* one empty"),
    ("sst", "", r"in.txt: no input lines"),
])
def test_malformed_input_names_its_line(trained, tmp_path, task, text, message):
    (tmp_path / "in.txt").write_text(text)
    with pytest.raises(DataError, match=message):
        predict.main(["--load", os.path.join(trained, "best.pt"), "--task", task,
                      "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o")])
    assert not os.path.exists(tmp_path / "o")


def test_errors_are_one_line_and_exit_2(trained, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the movie is good .\n\n"))
    monkeypatch.setattr("sys.argv", ["predict.py", "--load", os.path.join(trained, "best.pt"),
                                     "--task", "sst"])
    assert predict.cli() == 2
    assert capsys.readouterr().err == "error: <stdin>, line 2: empty line\n"
