"""--compile (engine/compiling.py): TaskLosses compiled in place. The plumbing is tested with
Dynamo's `eager` backend (MINBERT_COMPILE_BACKEND), which traces the step (graph breaks,
guards, recompiles) but runs torch's own kernels: its numbers are the eager step's bit for
bit. One test (slow) compiles with inductor itself (C++ kernels built by gcc): equal to eager
up to float reassociation (RTOL, ATOL below).
The resume case (a compiled run killed, resumed, equal to the eager run, plain keys saved) and
the torchrun one are in test_resume.py and test_ddp.py."""
import copy
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import multitask_classifier as mtc
from engine.compiling import BACKEND_ENV, compile_backend, compile_losses
from engine.configs import MultitaskConfig
from engine.distributed import Dist
from engine.errors import ConfigError
from engine.step import make_context, train_step
from engine.task_grads import PackedTaskPass

from test_packed import NoStep, one_step, step_setup  # noqa: F401 (a fixture)
from test_training import run_args

CPU = torch.device("cpu")
# Inductor's kernels sum in other orders and its exp/erf are vectorised approximations
# (within a few ulp): its losses and gradients are within these of eager's on the tiny
# model, in fp32. atol is relative to the largest gradient of all (as test_packed.close).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_step(model, tasks, drawn, aggregator):
    """one_step (test_packed) with TaskLosses compiled, as build_parts does (with its row
    gradients for the word embedding: exactly the dense ones, test_row_gradients.py)."""
    from engine.combiner import Combiner
    from engine.configs import Combination
    from engine.row_gradients import use_row_gradients
    from pcgrad import PCGrad
    assert use_row_gradients(model.encoder, CPU, distributed=False)
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    combiner = None if aggregator is None else Combiner(
        Combination(aggregator), PCGrad(shared, len(tasks)), len(tasks), 0)
    ctx = make_context(model, tasks, Dist(0, 1, 0, CPU), model.precision, find_unused=False,
                       combined=shared if combiner else [], packed=True)
    compile_losses(ctx.local, "default", CPU)
    values, gram, _ = train_step(ctx, tasks, drawn, NoStep(model.parameters()), combiner)
    return values, gram, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_close_step(found, want, exact: bool):
    (values, gram, grads), (ref_values, ref_gram, ref_grads) = found, want
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    scale = max(g.abs().max().item() for g in ref_grads.values())
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": RTOL, "atol": ATOL * scale}
    torch.testing.assert_close(torch.tensor(values), torch.tensor(ref_values), **tol)
    if ref_gram is not None:
        torch.testing.assert_close(gram, ref_gram, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize("aggregator, backend", [(None, "eager"), ("pcgrad", "eager"),
                                                ("pcgrad", "aot_eager")])
def test_a_compiled_step_is_the_eager_step(step_setup, monkeypatch, aggregator, backend):  # noqa: F811
    """Losses and every gradient (two micro-batches per task, packed; or PCGrad's per-task
    passes) through the compiled TaskLosses: bitwise those of the eager step (Dynamo's eager
    backend), or up to float reassociation with AOTAutograd's traced backward (as inductor
    has it: one backward node for all of a call's losses, which the per-task passes keep)."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    # a compiled run takes PCGrad's per-task passes (engine/task_grads.py does not apply):
    # so does the eager reference here, for a bitwise comparison
    monkeypatch.setattr(PackedTaskPass, "start", classmethod(lambda cls, *args: None))
    model, tasks, drawn = step_setup
    want = one_step(copy.deepcopy(model), tasks, drawn, True, aggregator)
    found = compiled_step(model, tasks, drawn, aggregator)
    assert counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
    assert_close_step(found, want, exact=backend == "eager")


@pytest.mark.slow  # cold: ~2 min (OMP_NUM_THREADS=1, 2 busy cores; gcc), warm cache ~20 s
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor's CPU kernels need a C++ compiler")
def test_inductor_step_equals_eager_up_to_reassociation(step_setup, monkeypatch):  # noqa: F811
    """The real backend: C++ kernels for this CPU (gcc), dynamic shapes."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert compile_backend() == "inductor"
    model, tasks, drawn = step_setup
    want = one_step(copy.deepcopy(model), tasks, drawn, True, None)
    found = compiled_step(model, tasks, drawn, None)
    assert counters["stats"]["unique_graphs"] > 0
    assert_close_step(found, want, exact=False)


def test_compile_mode_needs_compile_and_reduce_overhead_a_gpu(tiny_checkpoint, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--compile_mode max-autotune needs --compile"):
        MultitaskConfig(compile_mode="max-autotune")
    with pytest.raises(ConfigError, match="reduce-overhead records CUDA graphs"):
        mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--compile",
                          "--compile_mode", "reduce-overhead"))
    assert not (tmp_path / "run").exists()  # refused before the run folder
