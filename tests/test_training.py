"""End-to-end runs of both scripts on a tiny random BERT and tiny data files."""
import json
import os

import pytest
import torch

import classifier
import multitask_classifier as mtc
from evaluation import read_predictions


def run_args(tiny_checkpoint, tiny_data, run_dir, *extra):
    return ["--checkpoint", tiny_checkpoint, "--data_dir", tiny_data, "--run_dir", str(run_dir),
            "--epochs", "4", "--lr", "3e-3", "--batch_size_sst", "4", "--batch_size_quora", "4",
            "--batch_size_sts", "4", "--batch_size_aux", "4", "--no-progress", "--seed", "1",
            "--max_length", "64",
            *extra]


def epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("extra", [
    ["--option", "pretrain", "--mode", "mix", "--quora_encoding", "bi"],
    ["--option", "finetune", "--mode", "seq"],
    ["--option", "finetune", "--mode", "mix", "--quora_encoding", "cross", "--sts_encoding", "cross",
     "--grad_diagnostics_every", "2"],
    ["--option", "finetune", "--mode", "mix", "--pcgrad"],
    ["--option", "finetune", "--mode", "mix", "--pcgrad", "--aux", "AUX"],
    ["--option", "finetune", "--mode", "mix", "--pcgrad", "--precision", "bf16"],
], ids=["pretrain", "seq", "mix-cross", "mix-pcgrad", "mix-pcgrad-aux", "mix-pcgrad-bf16"])
def test_modes_train_and_write_results(tiny_checkpoint, tiny_data, tmp_path, extra):
    extra = [os.path.join(tiny_data, "yelp-aux-train.csv") if a == "AUX" else a for a in extra]
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", *extra))
    records = epochs(run_dir)
    assert len(records) == 4
    first, last = records[0]["train_loss"], records[-1]["train_loss"]
    # With the encoder frozen, the STS cosine head has nothing to train: its loss only
    # follows the data order.
    learning = [k for k in first if not ("pretrain" in extra and k == "sts")]
    assert sum(last[k] for k in learning) < sum(first[k] for k in learning)
    assert set(records[0]["dev"]) == {"sst", "quora", "sts"}
    if "--aux" in extra:
        assert "aux" in first
    if extra[1::2][:2] == ["finetune", "mix"]:  # diagnostics with and without --pcgrad
        assert set(records[0]["grad"]) == {"sst/quora", "sst/sts", "quora/sts"} | (
            {"sst/aux", "quora/aux", "sts/aux"} if "--aux" in extra else set())
        norms = records[0]["grad_norm"]
        assert set(norms) == set(records[0]["train_loss"]) and all(v > 0 for v in norms.values())
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    best = records[summary["best_epoch"] - 1]
    assert best["overall"] == max(r["overall"] for r in records)
    files = sorted(os.listdir(os.path.join(run_dir, "predictions")))
    assert files == ["quora-dev-output.csv", "sst-dev-output.csv", "sst-test-output.csv",
                     "sts-dev-output.csv", "sts-test-output.csv"]


def test_steps_jsonl_is_a_live_log(tiny_checkpoint, tiny_data, tmp_path):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "2",
                                "--log_every_steps", "2", "--pcgrad"))
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]  # 6 steps an epoch
    assert [r["epoch"] for r in records] == [1, 1, 1, 2, 2, 2]
    first = records[0]
    assert set(first["loss"]) == set(first["grad_norm"]) == {"sst", "quora", "sts"}
    assert set(first["cos"]) == {"sst/quora", "sst/sts", "quora/sts"}
    assert all(-1 <= c <= 1 for c in first["cos"].values()) and first["lr"] == 3e-3
    # the mean of the logged windows is the epoch's mean loss
    epoch1 = epochs(run_dir)[0]["train_loss"]["sst"]
    assert sum(r["loss"]["sst"] for r in records[:3]) / 3 == pytest.approx(epoch1)


@pytest.mark.parametrize("extra, sampled", [(["--grad_diagnostics_every", "4"], {4, 8, 12}),
                                           (["--grad_diagnostics_every", "4", "--pcgrad"], set(range(1, 13)))])
def test_diagnostics_are_sampled_on_every_nth_step(tiny_checkpoint, tiny_data, tmp_path, extra, sampled):
    """With the sum, the Gram matrix is computed on steps N, 2N, ... only, and the epoch
    means are over those steps; an aggregator needs it, and logs it, every step."""
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "2",
                                "--log_every_steps", "1", *extra))
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 12  # 6 steps an epoch
    assert {r["step"] for r in records if "grad_norm" in r} == sampled
    for epoch in epochs(run_dir):
        logged = [r["grad_norm"]["sts"] for r in records if r["epoch"] == epoch["epoch"] and "grad_norm" in r]
        assert epoch["grad_norm"]["sts"] == pytest.approx(sum(logged) / len(logged), rel=1e-4)


def test_a_subset_of_tasks_trains_alone(tiny_checkpoint, tiny_data, tmp_path):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--tasks", "quora,sts", "--pcgrad"))
    record = epochs(run_dir)[0]
    assert set(record["dev"]) == set(record["train_loss"]) == {"quora", "sts"}
    assert set(record["grad"]) == {"quora/sts"}
    assert record["overall"] == pytest.approx((record["dev"]["quora"] + record["dev"]["sts"]) / 2)


def test_pretrain_freezes_the_encoder(tiny_checkpoint, tiny_data, tmp_path):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run",
                                "--option", "pretrain", "--epochs", "1"))
    saved = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)
    from base_bert import from_pretrained
    original = from_pretrained(tiny_checkpoint).state_dict()
    for name, tensor in original.items():
        torch.testing.assert_close(saved["model"][f"encoder.{name}"], tensor)


def test_checkpoint_reloads_to_identical_predictions(tiny_checkpoint, tiny_data, tmp_path):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "2"))
    eval_dir = mtc.main(["--eval_only", "--load", os.path.join(run_dir, "best.pt"),
                         "--data_dir", tiny_data, "--run_dir", str(tmp_path / "eval")])
    for name in os.listdir(os.path.join(run_dir, "predictions")):
        assert read_predictions(os.path.join(eval_dir, "predictions", name)) == \
            read_predictions(os.path.join(run_dir, "predictions", name))


def test_seeded_runs_repeat(tiny_checkpoint, tiny_data, tmp_path):
    args = ["--epochs", "1", "--pcgrad"]
    a = epochs(mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "a", *args)))
    b = epochs(mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "b", *args)))
    assert a[0]["train_loss"] == b[0]["train_loss"] and a[0]["dev"] == b[0]["dev"]


@pytest.mark.parametrize("task", ["sst", "cfimdb"])
def test_classifier_trains_and_predicts(tiny_checkpoint, tiny_data, tmp_path, task):
    run_dir = tmp_path / task
    summary = classifier.main(["--task", task, "--option", "finetune", "--checkpoint",
                               tiny_checkpoint, "--data_dir", tiny_data, "--run_dir", str(run_dir),
                               "--epochs", "4", "--lr", "3e-3", "--batch_size", "4",
                               "--no-progress", "--max_length", "64"])
    records = epochs(run_dir)
    assert records[-1]["train_loss"][task] < records[0]["train_loss"][task]
    assert summary["best"][task] == max(r["dev"][task] for r in records)
    preds = read_predictions(os.path.join(run_dir, "predictions", f"{task}-dev-output.csv"))
    assert len(preds) == 24 and set(preds.values()) <= {"0", "1", "2", "3", "4"}


def test_cli_errors_name_the_problem(tiny_checkpoint, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["mtc", "--data_dir", str(tmp_path / "none"),
                                     "--checkpoint", tiny_checkpoint, "--max_length", "64"])
    assert mtc.cli() == 2
    assert "ids-sst-train.csv: file not found" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["mtc", "--mode", "seq", "--pcgrad"])
    assert mtc.cli() == 2
    assert "--pcgrad needs --mode mix" in capsys.readouterr().err
    done = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "done", "--epochs", "1"))
    monkeypatch.setattr("sys.argv", ["mtc", *run_args(tiny_checkpoint, tiny_data, done)])
    assert mtc.cli() == 2
    assert "already holds a run (metrics.jsonl, summary.json, best.pt" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["clf", "--checkpoint", str(tmp_path / "nowhere")])
    assert classifier.cli() == 2
    assert "nowhere: checkpoint folder not found" in capsys.readouterr().err


def test_bf16_forward_is_fp32_out_and_close(tiny_checkpoint, tiny_data):
    from base_bert import from_pretrained
    from engine.heads import MultitaskBERT
    from engine.precision import Precision
    from engine.specs import SPECS
    from engine.tasks import build_task
    from tokenizer import BertTokenizer
    encoder = from_pretrained(tiny_checkpoint).eval()
    task = build_task(SPECS["sts"], tiny_data, BertTokenizer.from_pretrained(tiny_checkpoint),
                      encoder.config, 4, 0.0, encoding="bi")
    batch = task.collate(task.train[:4])
    model = MultitaskBERT(encoder, {"sts": task.head})
    with torch.no_grad():
        full = model("sts", batch)
        model.precision = Precision("bf16", "cpu")
        half = model("sts", batch)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("pooling, pooler_trains", [("mean", False), ("pooler", True)])
def test_pooler_trains_only_when_a_head_reads_it(tiny_checkpoint, tiny_data, tmp_path,
                                                 pooling, pooler_trains):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--pcgrad", "--weight_decay", "0.1", "--pooling", pooling,
                                "--quora_encoding", "cross", "--sts_encoding", "cross"))
    saved = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)["model"]
    from base_bert import from_pretrained
    original = from_pretrained(tiny_checkpoint).state_dict()
    name = "pooler_dense.weight"
    assert torch.equal(saved[f"encoder.{name}"], original[name]) != pooler_trains
    assert not torch.equal(saved["encoder.bert_layers.0.out_dense.weight"],
                           original["bert_layers.0.out_dense.weight"])


@pytest.mark.parametrize("extra", [["--pcgrad"], ["--grad_diagnostics_every", "2"]],
                         ids=["pcgrad", "sum"])
def test_freeze_word_embeddings_freezes_that_parameter_only(tiny_checkpoint, tiny_data, tmp_path,
                                                            extra):
    """Even under weight decay: a frozen parameter gets no AdamW pass at all."""
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--weight_decay", "0.1", "--freeze_word_embeddings", *extra))
    assert json.load(open(os.path.join(run_dir, "config.json")))["freeze_word_embeddings"] is True
    saved = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)["model"]
    from base_bert import from_pretrained
    original = from_pretrained(tiny_checkpoint).state_dict()
    frozen = {"word_embedding.weight", "pooler_dense.weight", "pooler_dense.bias"}  # the pooler: unread
    for name, tensor in original.items():
        assert torch.equal(saved[f"encoder.{name}"], tensor) == (name in frozen), name


def test_heads_get_their_own_learning_rate_on_the_shared_schedule():
    from engine.build import make_optimizer
    encoder, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    settings = mtc.MultitaskConfig(epochs=1, lr=1e-5, head_lr=1e-3, warmup_ratio=0.5)
    optimizer, scheduler = make_optimizer(encoder.parameters(), head.parameters(), settings, 10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-6, 2e-4])  # warmup 1/5
    same, _ = make_optimizer(encoder.parameters(), head.parameters(),
                             mtc.MultitaskConfig(epochs=1, lr=1e-5), 10)
    assert [g["lr"] for g in same.param_groups] == [1e-5, 1e-5]


def test_tensorboard_gets_the_step_records(tiny_checkpoint, tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--log_every_steps", "3", "--tensorboard"))
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/sst")] == [3, 6]
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        logged = [json.loads(line)["loss"]["sst"] for line in f]
    assert [e.value for e in events.Scalars("loss/sst")] == pytest.approx(logged)
