"""fp16 with loss scaling (the GPU path where bf16 is not native), exercised on the CPU:
autocast to float16 and torch.amp.GradScaler work there too. An overflow skips the step
(parameters unchanged, the scale backs off) instead of stopping the run as divergent."""
import pytest
import torch

from engine import run
from engine.combiner import Combiner
from engine.configs import Combination
from engine.distributed import Dist
from engine.names import PRECISIONS
from engine.precision import Precision
from engine.step import make_context, train_step
from multitask_classifier import MultitaskConfig, build_tasks
from optimizer import AdamW
from pcgrad import PCGrad


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
    assert Precision.resolve("fp32", cpu).dtype is None
    assert Precision.resolve("fp16", cpu).dtype == torch.float16
    assert Precision.resolve("bf16", cpu).dtype == torch.bfloat16
    assert Precision.resolve("auto", cpu).name in ("fp32", "bf16")  # never fp16 on a CPU
    assert [Precision.resolve(p, cpu).scales_loss for p in ("fp32", "bf16", "fp16")] == \
        [False, False, True]
    assert Precision.resolve("fp16", cpu).make_scaler() is not None
    assert Precision.resolve("bf16", cpu).make_scaler() is None
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16", "auto"}
    with pytest.raises(ValueError, match="unknown precision"):
        Precision.resolve("fp8", cpu)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("surgery", [False, True])
def test_fp16_step_trains_and_an_overflow_skips_the_step(setup, surgery, packed):
    model, tasks = setup
    assert model.precision.dtype == torch.float16
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    pc = Combiner(Combination("pcgrad"), PCGrad(shared, len(tasks)), len(tasks), 0) \
        if surgery else None
    ctx = make_context(model, tasks, Dist(0, 1, 0, torch.device("cpu")), model.precision,
                       find_unused=False, combined=shared if surgery else [], ddp=not surgery,
                       packed=packed)
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


def test_the_loss_scale_is_part_of_the_resumable_state(tiny_checkpoint, tiny_data, tmp_path):
    """An fp16 resume continues with the loss scale (and its growth count) it stopped with,
    not a fresh GradScaler's."""
    from engine.build import build_parts
    from engine.trainer import Trainer
    cfg = MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64,
                          progress=False, precision="fp16", run_dir=str(tmp_path))

    def trainer() -> Trainer:
        s = run.setup(cfg)
        tasks = build_tasks(cfg, s.tokenizer, s.encoder.config, ("train", "dev"))
        parts = build_parts(cfg, run.build_model(cfg, s.encoder, tasks, s.device), tasks,
                            Dist(0, 1, 0, s.device))
        return Trainer(parts, cfg, Dist(0, 1, 0, s.device), str(tmp_path), {"config": {}})
    first = trainer()
    first.ctx.scaler.scale(torch.ones(()))  # the scale tensor is made on first use
    first.ctx.scaler.update(new_scale=1024.0)
    first.save()
    from engine.trainer_state import load_state
    second = trainer()
    assert second.ctx.scaler.get_scale() == 65536.0  # a fresh scaler
    second.load_state_dict(load_state(first.last_path, second.dist))
    assert second.ctx.scaler.get_scale() == 1024.0
    assert second.ctx.scaler.state_dict() == first.ctx.scaler.state_dict()
