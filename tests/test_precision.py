"""fp16 with loss scaling (the GPU path where bf16 is not native), exercised on the CPU:
autocast to float16 and torch.amp.GradScaler work there too. An overflow skips the step
(parameters unchanged, the scale backs off) instead of stopping the run as divergent."""
import pytest
import torch

from engine import run
from engine.distributed import Dist
from multitask_classifier import MultitaskConfig, build_tasks
from optimizer import AdamW
from engine.step import make_context
from pcgrad import PCGrad
from engine.step import train_step
from utils import autocast_dtype


@pytest.fixture
def setup(tiny_checkpoint, tiny_data):
    cfg = MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64,
                          progress=False, precision="fp16", hidden_dropout_prob=0.0)
    s = run.setup(cfg)
    tasks = build_tasks(cfg, s.tokenizer, s.encoder.config, ("train",))
    model = run.build_model(cfg, s.encoder, tasks, s.device).train()
    model.train_encoder(True)
    return model, tasks


def drawn(tasks):
    return [([t.collate(t.train[:4])], 4) for t in tasks]


def test_precision_choices():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("fp16", cpu) == torch.float16
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", cpu) in (None, torch.bfloat16)  # never fp16 on a CPU


@pytest.mark.parametrize("surgery", [False, True])
def test_fp16_step_trains_and_an_overflow_skips_the_step(setup, surgery):
    model, tasks = setup
    assert model.autocast == torch.float16
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    pc = PCGrad(shared, len(tasks)) if surgery else None
    ctx = make_context(model, tasks, Dist(0, 1, 0, torch.device("cpu")), fp16=True,
                       find_unused=False, ddp=not surgery)
    optimizer = AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    values, gram, _ = train_step(ctx, tasks, drawn(tasks), optimizer, pc)
    assert all(torch.isfinite(torch.tensor(values)))
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert any(moved)  # a normal scale: the step was taken
    if surgery:  # the Gram matrix of the unscaled gradients (scale 65536 divided out)
        assert torch.isfinite(gram).all() and gram[0, 0] < 1e4
    ctx.scaler.update(new_scale=3e38)  # the scaled gradients overflow float32
    before = [p.detach().clone() for p in model.parameters()]
    train_step(ctx, tasks, drawn(tasks), optimizer, pc)  # no NonFinite: the scaler handles it
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # skipped
    assert ctx.scaler.get_scale() < 3e38  # and backed off
