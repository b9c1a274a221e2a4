import math

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


def test_length_sorted_batches_predict_in_file_order(tiny_checkpoint, tiny_data):
    """Evaluation batches sentences of similar length; the predictions must still be each
    example's own, in file order: the same as predicting one example at a time."""
    import torch

    import evaluation
    from engine import run
    from multitask_classifier import MultitaskConfig, build_tasks
    cfg = MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64,
                          progress=False)
    s = run.setup(cfg)
    tasks = build_tasks(cfg, s.tokenizer, s.encoder.config, ("dev",))
    model = run.build_model(cfg, s.encoder, tasks, s.device)
    for task in tasks:
        batches = evaluation.eval_batches(task, task.examples("dev"))
        assert sorted(i for b in batches for i in b) == list(range(len(task.examples("dev"))))
        assert any(b != sorted(b) for b in batches) or len(batches) == 1
        got = evaluation.predict(model, task, "dev", s.device)
        one_by_one = evaluation.EVAL_BATCH_SIZE
        try:
            evaluation.EVAL_BATCH_SIZE = 1
            task.batch_size, size = 1, task.batch_size
            want = evaluation.predict(model, task, "dev", s.device)
        finally:
            evaluation.EVAL_BATCH_SIZE, task.batch_size = one_by_one, size
        assert got.ids == [e.id for e in task.examples("dev")] == want.ids
        assert got.labels == want.labels
        assert torch.allclose(torch.tensor(got.values, dtype=torch.float64),
                              torch.tensor(want.values, dtype=torch.float64), atol=1e-5)
