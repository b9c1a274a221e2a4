"""Kill/resume for the modes whose extra state lives in the optimizer, the model or the
combiner (EMA shadow, GradScaler, GradVac / FAMO / smoothing state, balancer state, R-Drop and
layer-decay groups, two-head pairs): killed mid-epoch 2, resumed, compared with the
uninterrupted run. A file of its own so that pytest-xdist runs it beside tests/test_resume.py."""
import pytest

from test_resume import MODES, STREAM_MODES, kill_and_resume, uninterrupted_runs


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tiny_data, tmp_path_factory):
    return uninterrupted_runs(tiny_checkpoint, tiny_data, tmp_path_factory)


@pytest.mark.parametrize("mode", [m for m in MODES if m not in STREAM_MODES])
def test_killed_mid_epoch_resumes_to_the_same_result(tiny_checkpoint, tiny_data, tmp_path,
                                                      reference, mode):
    kill_and_resume(tiny_checkpoint, tiny_data, tmp_path, reference, mode, 3)
