"""The run path: --eval_only's folder and inputs, checkpoint kinds, config checks."""
import os
import shutil

import pytest

import classifier
import multitask_classifier as mtc
from engine import run
from engine.errors import CheckpointError, ConfigError
from evaluation import read_predictions

from test_training import run_args


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    return mtc.main(run_args(tiny_checkpoint, tiny_data, run_dir, "--epochs", "1"))


def evaluate(trained, data_dir, *extra):
    return mtc.main(["--eval_only", "--load", os.path.join(trained, "best.pt"),
                     "--data_dir", data_dir, *extra])


def test_eval_only_never_writes_over_a_run_or_an_earlier_evaluation(trained, tiny_data):
    before = read_predictions(os.path.join(trained, "predictions", "sst-dev-output.csv"))
    with pytest.raises(ConfigError, match="already holds a run"):
        evaluate(trained, tiny_data, "--run_dir", trained)
    first = evaluate(trained, tiny_data)
    second = evaluate(trained, tiny_data)
    assert first != second and os.path.basename(second) == "eval-2"
    with pytest.raises(ConfigError, match="already holds a run or an evaluation"):
        evaluate(trained, tiny_data, "--run_dir", first)
    assert read_predictions(os.path.join(trained, "predictions", "sst-dev-output.csv")) == before
    assert read_predictions(os.path.join(first, "predictions", "sst-dev-output.csv")) == before


def test_eval_only_reads_no_training_file(trained, tiny_data, tmp_path):
    data = tmp_path / "eval-data"
    shutil.copytree(tiny_data, data)
    for name in os.listdir(data):
        if "train" in name:
            os.remove(data / name)
    out = evaluate(trained, str(data), "--run_dir", str(tmp_path / "ev"))
    assert sorted(os.listdir(os.path.join(out, "predictions")))[0] == "quora-dev-output.csv"


def test_eval_precision_follows_the_device_it_runs_on(trained, tiny_data, tmp_path, monkeypatch):
    saved = run.load_saved(os.path.join(trained, "best.pt"), "multitask")
    saved["config"].update(use_gpu=True, precision="auto")  # trained on a GPU, say
    seen = []
    resolve = run.Precision.resolve
    monkeypatch.setattr(run.Precision, "resolve",
                        lambda flag, device: seen.append(device.type) or resolve("fp32", device))
    cfg = mtc.MultitaskConfig.from_saved(saved["config"], data_dir=tiny_data, use_gpu=False)
    run.evaluate_saved("best.pt", cfg, mtc.build_tasks, saved, str(tmp_path / "e"),
                       run.choose_device(False))
    assert seen == ["cpu"]


def test_eval_only_names_the_flags_it_ignores(trained, tiny_data, capsys):
    evaluate(trained, tiny_data, "--lr", "0.5", "--mode", "seq")
    assert "ignoring --lr, --mode" in capsys.readouterr().out


def test_a_classifier_checkpoint_is_refused_by_the_multitask_script(
        tiny_checkpoint, tiny_data, tmp_path):
    clf = tmp_path / "clf"
    classifier.main(["--task", "sst", "--checkpoint", tiny_checkpoint, "--data_dir", tiny_data,
                     "--run_dir", str(clf), "--epochs", "1", "--no-progress", "--max_length", "64"])
    with pytest.raises(CheckpointError, match=r"a classifier checkpoint; .*\(use classifier.py\)"):
        evaluate(str(clf), tiny_data)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "-1e-3"], "--lr must be a finite number in \\(0, inf\\), got -0.001"),
    (["--hidden_dropout_prob", "1.0"], "--hidden_dropout_prob must be a finite number in \\[0, 1\\)"),
    (["--max_length", "3"], "--max_length must be at least 4"),
    (["--subsample", "-5"], "--subsample must be 0"),
    (["--weight_quora", "inf"], "--weight_quora must be a finite number"),
])
def test_bad_options_are_refused_before_anything_runs(flags, message):
    with pytest.raises(ConfigError, match=message):
        mtc.main(flags)


def test_max_length_above_the_checkpoint_is_refused_up_front(tiny_checkpoint, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--max_length 128 exceeds the checkpoint's "
                                          "max_position_embeddings \\(64\\)"):
        mtc.main(["--checkpoint", tiny_checkpoint, "--data_dir", tiny_data,
                  "--run_dir", str(tmp_path / "r")])
    assert not os.path.exists(tmp_path / "r")


def test_the_results_tools_never_load_the_model():
    import subprocess
    import sys
    code = ("import sys, grid, report\nfrom analysis import results, plots, compare\n"
            "sys.exit('torch' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_an_eager_run_resumed_never_imports_dynamo(tiny_checkpoint, tiny_data, tmp_path):
    """torch imports torch._dynamo (~1.5 s) on the first call of anything it wraps in
    torch._disable_dynamo (the Optimizer's methods, an init on the meta device): a run that
    does not compile, here a resumed one (build, load_state_dict, steps, saves), goes without."""
    import signal
    import subprocess
    import sys
    from test_resume import killed
    run_dir = tmp_path / "r"
    argv = run_args(tiny_checkpoint, tiny_data, run_dir, "--epochs", "2", "--pcgrad",
                    "--save_every_steps", "4")
    assert killed("multitask", argv, 1).returncode == -signal.SIGKILL
    code = ("import sys, multitask_classifier as m\nm.main(sys.argv[1:])\n"
            "sys.exit('torch._dynamo' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, "--resume", str(run_dir), "--no-progress"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(run_dir / "summary.json")
