"""--sts_encoding both / --quora_encoding both: a pair task with a cross-encoder head and a
bi-encoder head, trained on the mean of their losses, predicting from the mean of their
scores (sts) or probabilities (quora). (Its exact resume is a case of tests/test_resume.py;
its export a run of tests/test_export.py.)"""
import os

import pytest
import torch
import torch.nn.functional as F

import multitask_classifier as mtc
from bert import BertModel
from datasets import Collator, Example
from engine.heads import BothHead, MultitaskBERT, head_kind, make_head
from engine.names import ENCODINGS
from engine.specs import SPECS
from engine.tasks import Task
from tokenizer import BertTokenizer

from test_predict import check_matches_dev
from test_training import epochs, run_args

PAIRS = [("the movie is great .", "the film was bad"), ("how do i cook rice ?", "what is a cat ?"),
         ("a woman sings .", "a man plays guitar ."), ("the dog runs . " * 6, "the cat sits .")]


def test_every_encoding_makes_a_head(tiny_config):
    kinds = {(task, e): head_kind(SPECS[task], e) for task in ("quora", "sts") for e in ENCODINGS}
    assert kinds[("sts", "both")] == kinds[("quora", "both")] == "both"
    for (task, encoding), kind in kinds.items():
        head = make_head(SPECS[task], tiny_config.hidden_size, 0.1, "mean", encoding, 0.02)
        assert head.kind == kind
    assert head_kind(SPECS["sst"], "both") == "linear"  # single sentences: one head


@pytest.fixture
def model_and_tasks(tiny_config, tiny_checkpoint):
    torch.manual_seed(3)
    tokenizer = BertTokenizer.from_pretrained(tiny_checkpoint, 64)
    tasks = {}
    for name in ("quora", "sts"):
        head = make_head(SPECS[name], tiny_config.hidden_size, 0.1, "cls", "both", 0.5)
        tasks[name] = Task(SPECS[name], head, Collator(tokenizer, both=True), 4)
    model = MultitaskBERT(BertModel(tiny_config), {n: t.head for n, t in tasks.items()}).eval()
    return model, tasks, tokenizer


@pytest.mark.parametrize("name", ["quora", "sts"])
def test_prediction_is_the_mean_of_the_two_sub_heads(model_and_tasks, name):
    """By value: each sub-head applied to its own encoding of the pairs (cross: one input;
    bi: two), the scores or probabilities averaged by hand."""
    model, tasks, tokenizer = model_and_tasks
    task, head = tasks[name], tasks[name].head
    label = 1 if name == "quora" else 2.5
    examples = [Example(str(i), pair, label) for i, pair in enumerate(PAIRS)]
    with torch.no_grad():
        cross_batch = Collator(tokenizer)(examples)
        cross = head.cross(model.encoder(**cross_batch.encoded.as_kwargs()), cross_batch)
        bi_batch = Collator(tokenizer, separate=True)(examples)
        bi = head.bi(model.encoder(**bi_batch.encoded.as_kwargs()), bi_batch)
        both = task.collate(examples)
        assert both.encoded.input_ids.shape[0] == 3 * len(examples)
        raw = model(name, both)  # (B, 2): cross, bi
        packed = model.forward_many([name], [both])[0]
    torch.testing.assert_close(raw, torch.stack([cross, bi], -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, raw, atol=1e-5, rtol=1e-5)
    output = task.output(raw)
    if name == "sts":
        torch.testing.assert_close(output, ((cross + bi) / 2).double(), atol=1e-5, rtol=1e-5)
        expected = ((cross + bi) / 2).clamp(0, 5)
        torch.testing.assert_close(task.predict(raw), expected.double(), atol=1e-5, rtol=1e-5)
    else:
        probability = (torch.sigmoid(cross) + torch.sigmoid(bi)) / 2
        torch.testing.assert_close(torch.sigmoid(output), probability.double(), atol=1e-6, rtol=1e-6)
        assert task.predict(raw).tolist() == (probability > 0.5).long().tolist()
        assert task.detail(raw, task.predict(raw)) == pytest.approx(probability.tolist(), abs=1e-6)
    # trained on the mean of the two heads' losses
    loss = F.mse_loss if name == "sts" else lambda o, y: F.binary_cross_entropy_with_logits(o, y.float())
    labels = both.labels
    torch.testing.assert_close(task.loss(raw, labels), (loss(cross, labels) + loss(bi, labels)) / 2)


def test_the_head_describes_both_parts(model_and_tasks):
    _, tasks, _ = model_and_tasks
    entry = tasks["quora"].describe({"quora": 0.5})
    assert entry["kind"] == "both" and entry["num_outputs"] == 1
    assert entry["cross"]["kind"] == "linear" and entry["bi"]["kind"] == "bi_features"
    assert "quora.cross.linear.weight" in entry["cross"]["formula"]
    assert "quora.bi.linear.weight" in entry["bi"]["formula"]
    assert "sigmoid" in entry["formula"]
    assert set(entry["tensors"]) == {"quora.cross.linear.weight", "quora.cross.linear.bias",
                                     "quora.bi.linear.weight", "quora.bi.linear.bias"}
    assert isinstance(tasks["sts"].head, BothHead) and tasks["sts"].head.bi.kind == "bi_cosine"


@pytest.mark.parametrize("extra", [[], ["--no-packed"], ["--mode", "seq"]],
                         ids=["packed", "no-packed", "seq"])
def test_a_run_with_both_heads_trains_and_predict_py_reads_it(tiny_checkpoint, tiny_data, tmp_path,
                                                              extra):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "2",
                                "--sts_encoding", "both", "--quora_encoding", "both", *extra))
    records = epochs(run_dir)
    assert len(records) == 2 and set(records[0]["dev"]) == {"sst", "quora", "sts"}
    saved = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)
    for name in ("quora", "sts"):
        assert {f"heads.{name}.cross.linear.weight", f"heads.{name}.bi.linear.weight"
                if name == "quora" else f"heads.{name}.cross.linear.bias"} <= set(saved["model"])
        (tmp_path / name).mkdir()
        check_matches_dev(run_dir, tiny_data, name, tmp_path / name)
