import numpy as np
import pytest

from evaluation import accuracy, pearson, read_predictions, write_predictions
from runfiles import atomic_write


def test_accuracy_and_pearson():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    x = [0.1, 0.5, 0.2, 0.9]
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [0.3, 0.1, 0.9, 0.2]) == pytest.approx(np.corrcoef(x, [0.3, 0.1, 0.9, 0.2])[0, 1])
    assert pearson([1.0, 1.0], [0.0, 2.0]) == 0.0


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
