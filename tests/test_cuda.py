"""The GPU path, run only where CUDA is present (skipped elsewhere): the encoder on CUDA
matches the CPU, every training mode runs with --use_gpu under each precision, fp16 uses
loss scaling, and with 2+ GPUs torchrun's nccl run equals one process on the global batch.
scripts/gpu_check.sh runs this module and the GPU benchmarks in one go."""
import os

import pytest
import torch

import multitask_classifier as mtc
from base_bert import from_pretrained
from test_ddp import args, assert_same_model, lines, still_checkpoint, torchrun  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_encoder_on_cuda_matches_the_cpu(tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint).eval()
    ids = torch.randint(5, model.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        cpu = model(input_ids=ids, attention_mask=mask).last_hidden_state
        gpu = model.cuda()(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "auto"])
@pytest.mark.parametrize("mode", [["--mode", "mix", "--pcgrad"], ["--mode", "mix"],
                                  ["--mode", "seq"], ["--mode", "mix", "--aggregator", "upgrad"]])
def test_training_runs_on_cuda(still_checkpoint, tiny_data, tmp_path, precision, mode):  # noqa: F811
    run_dir = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "run", 4, "--use_gpu",
                            "--precision", precision, *mode))
    records = lines(run_dir)
    assert len(records) == 2 and all(0 <= r["overall"] <= 1 for r in records)
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))


def test_cuda_fp32_equals_the_cpu_run(still_checkpoint, tiny_data, tmp_path):  # noqa: F811
    gpu = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "gpu", 6, "--use_gpu", "--pcgrad"))
    cpu = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "cpu", 6, "--pcgrad"))
    assert_same_model(gpu, cpu, atol=1e-4)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_cuda_run_equals_eager(still_checkpoint, tiny_data, tmp_path, mode):  # noqa: F811
    """--compile with inductor on the GPU (Triton kernels; reduce-overhead: CUDA graphs,
    one per batch shape), the packed plain step and the sampled diagnostics' per-task passes."""
    extra = ["--use_gpu", "--grad_diagnostics_every", "3"]
    compiled = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "compiled", 6, *extra,
                             "--compile", "--compile_mode", mode))
    eager = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "eager", 6, *extra))
    assert_same_model(compiled, eager, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("extra", [[], ["--pcgrad"]])
def test_nccl_two_gpus_equal_one_process(still_checkpoint, tiny_data, tmp_path, extra):  # noqa: F811
    two = tmp_path / "two"
    done = torchrun(args(still_checkpoint, tiny_data, two, 3, "--use_gpu", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    one = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "one", 6, "--use_gpu", *extra))
    assert_same_model(str(two), one, atol=1e-4)
