import math
from types import SimpleNamespace

import numpy as np
import pytest

from evaluation import accuracy, pearson, read_predictions, write_predictions
from engine.runfiles import atomic_write


def pearson_by_hand(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_accuracy_and_pearson():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    x = [0.1, 0.5, 0.2, 0.9]
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [0.3, 0.1, 0.9, 0.2]) == pytest.approx(np.corrcoef(x, [0.3, 0.1, 0.9, 0.2])[0, 1])
    assert pearson([1.0, 1.0], [0.0, 2.0]) == 0.0


def test_pearson_against_the_formula():
    # worked: x = (1, 2, 3), y = (1, 3, 2): deviations (-1, 0, 1) and (-1, 1, 0),
    # cov = 1, sums of squares 2 and 2: r = 1 / 2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-12)
    x, y = [0.3, 1.7, 2.2, 4.0, 4.1, 0.0], [1.0, 2.5, 1.9, 4.4, 3.0, 0.2]
    assert pearson(x, y) == pytest.approx(pearson_by_hand(x, y), abs=1e-12)
    assert pearson(x, [-v for v in y]) == pytest.approx(-pearson_by_hand(x, y), abs=1e-12)
    assert pearson(x, [-3 * v + 2 for v in x]) == pytest.approx(-1.0, abs=1e-12)
    assert isinstance(pearson(x, y), float)


def test_pearson_of_a_constant_side_is_zero():
    for x, y in [([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),
                 ([1.0, 1.0], [1.0, 1.0])]:
        value = pearson(x, y)
        assert value == 0.0 and isinstance(value, float)


def test_accuracy_counts_matches():
    # 3 of 5 predictions equal their labels
    assert accuracy([0, 1, 1, 2, 0], [0, 1, 2, 2, 1]) == pytest.approx(3 / 5)
    assert accuracy([1, 1], [1, 1]) == 1.0 and accuracy([0, 0], [1, 1]) == 0.0
    assert isinstance(accuracy([1], [1]), float)


def test_accuracy_is_sklearns():
    from sklearn.metrics import accuracy_score
    rng = np.random.default_rng(0)
    for n, classes in [(1, 2), (7, 5), (1000, 3)]:
        labels, predictions = rng.integers(0, classes, n), rng.integers(0, classes, n)
        assert accuracy(list(predictions), list(labels)) == float(accuracy_score(labels, predictions))
    with pytest.raises(ValueError, match=r"\(3,\) predictions against \(2,\) labels"):
        accuracy([0, 1, 2], [0, 1])


def test_prediction_file_roundtrip(tmp_path):
    path = str(tmp_path / "out" / "sts-dev-output.csv")
    write_predictions(path, ["a", "b"], [1.23456, 4.0], "Similarity")
    assert open(path).readline().strip() == "id,Predicted_Similarity"
    assert read_predictions(path) == {"a": "1.2346", "b": "4.0000"}


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")

    def fail(f):
        f.write("half")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        atomic_write(str(path), fail)
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint, tiny_data):
    """The multitask model on the tiny checkpoint, its tasks with their dev sets, its device."""
    from engine import run
    from multitask_classifier import MultitaskConfig, build_tasks
    cfg = MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64,
                          progress=False)
    s = run.setup(cfg)
    tasks = build_tasks(cfg, s.tokenizer, s.encoder.config, ("dev",))
    return tasks, run.build_model(cfg, s.encoder, tasks, s.device), s.device


def test_length_sorted_batches_predict_in_file_order(tiny_model, monkeypatch):
    """Evaluation batches sentences of similar length; the predictions must still be each
    example's own, in file order: the same as predicting one example at a time."""
    import torch

    import evaluation
    tasks, model, device = tiny_model
    for task in tasks:
        monkeypatch.setattr(evaluation, "EVAL_TOKENS", 48)  # several batches of the 24
        batches = evaluation.eval_batches(task, task.examples("dev"))
        lengths = task.collate.lengths(task.examples("dev"))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        assert [i for b in batches for i in b] == order
        assert len(batches) > 2
        got = evaluation.predict(model, task, "dev", device)
        monkeypatch.setattr(evaluation, "EVAL_TOKENS", 1)  # one example a batch
        assert max(len(b) for b in evaluation.eval_batches(task, task.examples("dev"))) == 1
        want = evaluation.predict(model, task, "dev", device)
        assert got.ids == [e.id for e in task.examples("dev")] == want.ids
        assert got.labels == want.labels
        assert torch.allclose(torch.tensor(got.values, dtype=torch.float64),
                              torch.tensor(want.values, dtype=torch.float64), atol=1e-5)


def test_sharded_prediction_equals_one_process(tiny_model, monkeypatch):
    """Two processes each predict every other batch and gather the rows: every example
    once, in file order, bit for bit what one process predicts (both cut the same
    batches). The gather is emulated: rank 1 runs first, rank 0 then receives both."""
    import evaluation
    tasks, model, device = tiny_model
    monkeypatch.setattr(evaluation, "EVAL_TOKENS", 48)
    for task in tasks:
        assert len(evaluation.eval_batches(task, task.examples("dev"))) > 2
        whole = evaluation.predict(model, task, "dev", device)
        rows = {}

        def gather(mine):
            rows[rank] = mine
            return [rows[r] for r in sorted(rows)]
        monkeypatch.setattr(evaluation, "gather_objects", gather)
        for rank in (1, 0):
            dist = SimpleNamespace(enabled=True, rank=rank, world_size=2)
            sharded = evaluation.predict(model, task, "dev", device, dist)
        assert len(rows[0]) + len(rows[1]) == len(whole.ids) and rows[0] and rows[1]
        assert (sharded.ids, sharded.values, sharded.labels) == \
            (whole.ids, whole.values, whole.labels)


class LengthsOnly:
    """A task as eval_batches sees it: its collator's lengths and inputs per example (two
    for a bi-encoder pair), and its training batch size."""

    def __init__(self, lengths, inputs=1, batch_size=8):
        self.batch_size = batch_size
        self.collate = SimpleNamespace(lengths=lambda examples: list(lengths),
                                       inputs_per_example=lambda examples: inputs)


SPREAD = [200 - i for i in range(200)]  # lengths 200 .. 1: length order is not file order


@pytest.mark.parametrize("lengths, inputs, batch_size, sizes", [
    # one length, a large set: as many as 8192 tokens hold (819 x 10)
    ([10] * 2000, 1, 8, [819, 819, 362]),
    # a bi-encoder pair is two inputs: half as many
    ([10] * 2000, 2, 8, [409] * 4 + [364]),
    # long sentences: the token budget cuts below 64 (40 x 200 = 8000)
    ([200] * 100, 1, 8, [40, 40, 20]),
    # spread lengths: 64 (1..64), then padding would pass 5%; 64 (65..128) reach 8192
    # tokens; then 46 x 174 = 8004; the rest
    (SPREAD, 1, 8, [64, 64, 46, 26]),
    # a training batch size above 64 is the least a batch takes
    ([1 + i // 8 for i in range(400)], 1, 100, [100, 100, 100, 100]),
    ([1 + i // 8 for i in range(400)], 1, 8, [64] * 6 + [16]),
    # one example over the budget alone; ties in file order
    ([5, 9000, 5, 5], 1, 8, [3, 1]),
    ([], 1, 8, []),
])
def test_eval_batches_budget_tokens_and_padding(lengths, inputs, batch_size, sizes):
    import evaluation
    task = LengthsOnly(lengths, inputs, batch_size)
    batches = evaluation.eval_batches(task, [None] * len(lengths))
    assert [len(b) for b in batches] == sizes
    # every example once, sorted by length, ties in file order (a stable sort)
    assert [i for b in batches for i in b] == sorted(range(len(lengths)), key=lengths.__getitem__)
    least = max(batch_size, evaluation.EVAL_BATCH_SIZE)
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert len(b) == 1 or padded * inputs <= evaluation.EVAL_TOKENS
        assert len(b) <= least or padded - sum(lengths[i] for i in b) <= 0.05 * padded
