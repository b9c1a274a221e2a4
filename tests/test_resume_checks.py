"""--resume continues only what was saved: a changed config.json or training file, or a run of
the other script, is refused by name; a restart of a run that died before its first save
starts clean; relative paths and a moved checkpoint folder break nothing later."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import classifier
import export
import multitask_classifier as mtc
import predict
from engine import run, trainer
from engine.errors import ConfigError, UserError
from evaluation import read_predictions

from test_training import run_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 24 examples in batches of 4: 6 steps an epoch, the first save after step 4
EXTRA = ["--epochs", "2", "--save_every_steps", "4", "--log_every_steps", "1"]


class Killed(BaseException):
    """Not an Exception: nothing on the way out handles it, as nothing runs after kill -9."""


def interrupted(monkeypatch, main, argv, saves: int = 1) -> None:
    """main(argv), stopped right after the `saves`th save of last.pt (0: at the first save,
    before anything is written): in process, as tests/die_after_save.py does it with a signal."""
    original, calls = trainer.save_state, []

    def save_then_die(path, *rest):
        if len(calls) < saves:
            original(path, *rest)
        calls.append(path)
        if len(calls) == max(saves, 1):
            raise Killed()

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_state", save_then_die)
        with pytest.raises(Killed):
            main(argv)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def data(tiny_data, tmp_path):
    """A copy of the tiny data that a test may change."""
    return str(shutil.copytree(tiny_data, tmp_path / "data"))


def edit_config(run_dir, data):
    path = os.path.join(run_dir, "config.json")
    saved = json.loads(read(path))
    write(path, json.dumps({**saved, "lr": 0.1, "hidden_dropout_prob": 0.2}))


def edit_train_file(run_dir, data):  # same size: only the content digest sees it
    path = os.path.join(data, "ids-sst-train.csv")
    text = read(path)
    assert "is great ." in text
    write(path, text.replace("is great .", "is grand .", 1))


def edit_aux_file(run_dir, data):
    path = os.path.join(data, "yelp-aux-train.csv")
    write(path, read(path) + "99\ty99\tthe film is fine\t2\n")


def remove_train_file(run_dir, data):
    os.remove(os.path.join(data, "quora-train.csv"))


CHANGES = {
    "config.json edited": (edit_config, r"config\.json: hidden_dropout_prob 0\.3 -> 0\.2, lr 0\.003 -> 0\.1"),
    "train file changed": (edit_train_file, r"the sst training file \S*ids-sst-train\.csv changed"),
    "aux file changed": (edit_aux_file, r"the aux training file \S*yelp-aux-train\.csv changed"),
    "train file gone": (remove_train_file, r"the quora training file \S*quora-train\.csv is missing"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_refuses_a_changed_configuration_or_training_file(
        tiny_checkpoint, data, tmp_path, monkeypatch, change):
    run_dir = tmp_path / "run"
    aux = os.path.join(data, "yelp-aux-train.csv")
    interrupted(monkeypatch, mtc.main,
                run_args(tiny_checkpoint, data, run_dir, *EXTRA, "--aux", aux))
    edit, message = CHANGES[change]
    edit(str(run_dir), data)
    with pytest.raises(ConfigError, match=message) as refused:
        mtc.main(["--resume", str(run_dir), "--no-progress"])
    assert str(run_dir) in str(refused.value) and "\n" not in str(refused.value)
    assert os.path.exists(run_dir / "last.pt") and not os.path.exists(run_dir / "summary.json")


def classifier_args(checkpoint, data, run_dir):
    return ["--task", "sst", "--checkpoint", checkpoint, "--data_dir", data, "--run_dir",
            str(run_dir), "--batch_size", "4", "--max_length", "64", "--no-progress", *EXTRA]


@pytest.mark.parametrize("made_by, resumed_with", [("classifier", "multitask_classifier"),
                                                    ("multitask", "classifier")])
def test_resuming_the_other_scripts_run_is_one_line(tiny_checkpoint, tiny_data, tmp_path,
                                                     monkeypatch, made_by, resumed_with):
    run_dir = tmp_path / "run"
    if made_by == "classifier":
        interrupted(monkeypatch, classifier.main, classifier_args(tiny_checkpoint, tiny_data, run_dir))
    else:
        interrupted(monkeypatch, mtc.main, run_args(tiny_checkpoint, tiny_data, run_dir, *EXTRA))
    done = subprocess.run([sys.executable, f"{resumed_with}.py", "--resume", str(run_dir),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    made_by_script = "classifier.py" if made_by == "classifier" else "multitask_classifier.py"
    assert done.stderr.startswith(f"error: --resume {run_dir}: ") and made_by_script in done.stderr


def steps(run_dir):
    return [json.loads(line) for line in read(os.path.join(run_dir, "steps.jsonl")).splitlines()]


def die_before_first_save(monkeypatch, argv):
    interrupted(monkeypatch, mtc.main, argv, saves=0)


def diverge_before_first_save(monkeypatch, argv):
    with pytest.raises(UserError, match="loss became nan"):
        mtc.main(argv + ["--lr", "1e9"])


@pytest.mark.parametrize("death", [die_before_first_save, diverge_before_first_save],
                         ids=["killed", "diverged"])
def test_a_restart_after_death_before_the_first_save_starts_clean(
        tiny_checkpoint, tiny_data, tmp_path, monkeypatch, death):
    argv = run_args(tiny_checkpoint, tiny_data, tmp_path / "run", *EXTRA, "--tensorboard")
    death(monkeypatch, argv)
    assert not os.path.exists(tmp_path / "run" / "last.pt")
    run_dir = mtc.main(argv)  # the same command again: a fresh start in the same folder
    reference = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "reference", *EXTRA,
                                  "--tensorboard"))
    assert steps(run_dir) == steps(reference)
    assert not os.path.exists(os.path.join(run_dir, "diverged.json"))
    events = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert len(events) == 1, events


def test_relative_paths_work_from_any_folder(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    rel = {"checkpoint": os.path.relpath(tiny_checkpoint), "data_dir": os.path.relpath(tiny_data),
           "aux": os.path.relpath(os.path.join(tiny_data, "yelp-aux-train.csv"))}
    interrupted(monkeypatch, mtc.main, run_args(rel["checkpoint"], rel["data_dir"], "run", *EXTRA,
                                                "--aux", rel["aux"]))
    saved = json.loads(read(start / "run" / "config.json"))
    for key, path in rel.items():
        assert saved[key] == os.path.abspath(path), key
    monkeypatch.chdir(elsewhere)
    run_dir = str(start / "run")
    mtc.main(["--resume", run_dir, "--no-progress"])
    assert os.path.exists(os.path.join(run_dir, "summary.json"))
    # (without --aux: predict.py and --eval_only cannot rebuild a run trained with one yet)
    again = mtc.main(["--config", os.path.join(run_dir, "config.json"), "--run_dir", "again",
                      "--epochs", "1", "--aux", ""])
    assert os.path.exists(os.path.join(again, "summary.json"))
    write("in.txt", "the movie is great .\n")
    assert len(predict.main(["--load", os.path.join(again, "best.pt"), "--input", "in.txt"])) == 1


def test_best_pt_predicts_after_the_checkpoint_folder_is_moved(tiny_checkpoint, tiny_data, tmp_path):
    checkpoint = str(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    write(os.path.join(checkpoint, "tokenizer_config.json"), json.dumps({"do_lower_case": False}))
    original_vocab = read(os.path.join(checkpoint, "vocab.txt"))
    run_dir = mtc.main(run_args(checkpoint, tiny_data, tmp_path / "run", "--epochs", "1"))
    best = os.path.join(run_dir, "best.pt")
    write(tmp_path / "in.txt", "the movie is great .\nThe Movie is GREAT .\n")
    ask = ["--load", best, "--task", "sst", "--input", str(tmp_path / "in.txt")]
    before = predict.main(ask)
    shutil.move(checkpoint, tmp_path / "moved")

    assert predict.main(ask) == before
    evaluated = mtc.main(["--eval_only", "--load", best, "--data_dir", tiny_data,
                          "--run_dir", str(tmp_path / "eval")])
    for name in os.listdir(os.path.join(run_dir, "predictions")):
        if "-dev-" in name:
            assert read_predictions(os.path.join(evaluated, "predictions", name)) == \
                read_predictions(os.path.join(run_dir, "predictions", name))
    out = export.main(["--load", best, "--out", str(tmp_path / "hf")])
    assert read(os.path.join(out, "vocab.txt")) == original_vocab
    assert json.loads(read(os.path.join(out, "tokenizer_config.json")))["do_lower_case"] is False


def test_a_setting_added_after_the_save_counts_as_its_default(tiny_checkpoint, tiny_data,
                                                              tmp_path, monkeypatch):
    """A last.pt saved before a config field existed (its fingerprint lacks the key) still
    resumes when the field keeps its default; a hand-edited value is still refused."""
    import torch
    from engine.fingerprint import FINGERPRINT
    run_dir = tmp_path / "run"
    interrupted(monkeypatch, mtc.main, run_args(tiny_checkpoint, tiny_data, run_dir), saves=1)
    last = run_dir / "last.pt"
    saved = torch.load(last, weights_only=True)
    del saved[FINGERPRINT]["config"]["freeze_word_embeddings"]  # as an older version saved it
    torch.save(saved, last)
    cfg = run.resume_config(mtc.MultitaskConfig, {"resume": str(run_dir)}, mtc.SCRIPT)
    assert cfg.freeze_word_embeddings is False
