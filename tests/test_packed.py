"""The packed encoder pass (BertModel.forward_many, MultitaskBERT.forward_many): one pass
for all of a step's sequences, padding removed from the token-wise layers. It equals one
padded pass per batch up to float reassociation (fp32, dropout off): outputs, losses and
gradients, for the plain sum and for a combiner's per-task gradients (one packed pass,
engine/task_grads.py, against --no-packed's pass per task; tests/test_task_grads.py checks
those parameter by parameter)."""
import copy

import pytest
import torch

from bert import BertModel, Packing
from engine import run
from engine.combiner import Combiner
from engine.configs import Combination, MultitaskConfig
from engine.distributed import Dist
from engine.step import make_context, train_step
from multitask_classifier import build_tasks
from pcgrad import PCGrad
from tokenizer import Encoded


def encoded(lengths: list[int], width: int, pair: bool = False) -> Encoded:
    """Right-padded random inputs; `pair`: token types 0 then 1 (a cross-encoded pair)."""
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 100, mask.shape) * mask
    types = (torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return Encoded(ids, types if pair else torch.zeros_like(ids), mask)


BATCHES = [  # single sentences (one of [CLS] [SEP], one of [CLS] w [SEP]), a cross pair,
    # and a bi-encoder pair batch: (2B, T), first sentences then seconds
    lambda: encoded([2, 3, 9, 5], 9),
    lambda: encoded([12, 7], 14, pair=True),
    lambda: encoded([4, 6, 3, 3, 8, 2], 8),
]


@pytest.fixture
def encoder(tiny_config):
    tiny_config.hidden_dropout_prob = tiny_config.attention_probs_dropout_prob = 0.0
    return BertModel(tiny_config)


def close(a: torch.Tensor, b: torch.Tensor, what: str, scale: float = 0.0) -> None:
    """Equal up to float reassociation: 1e-6 relative to `scale` (default the tensor's).
    Gradients take the largest of all (the key bias's is zero up to rounding: softmax
    ignores a shift of every score)."""
    scale = max(scale or a.abs().max().item(), 1e-30)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale, msg=what)


def test_packing_round_trips_the_real_tokens():
    batches = [b() for b in BATCHES]
    packing = Packing.of(batches)
    assert packing.length == 14 and len(packing.index) == sum(int(b.attention_mask.sum()) for b in batches)
    assert packing.spans == [(0, 4, 9), (4, 6, 14), (6, 12, 8)]
    unpacked = packing.unpack(packing.pack(packing.input_ids))
    assert torch.equal(unpacked, packing.input_ids)  # padding ids are 0: zeros come back
    assert torch.equal(packing.pack(packing.attention_mask), torch.ones(len(packing.index)).long())


def test_unpack_writes_into_its_zeros_without_a_copy():
    """unpack scatters the real rows into fresh zeros in place (index_copy_), never a copy
    of the padded tensor (the out-of-place index_copy clones it first); its gradient is
    the real rows' slice of the padded gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    packing = Packing.of([b() for b in BATCHES])
    rows = torch.randn(len(packing.index), 6, requires_grad=True)
    with Ops() as seen:
        padded = packing.unpack(rows)
    assert "index_copy_.default" in seen.names
    assert not {"index_copy.default", "clone.default", "copy_.default"} & set(seen.names)
    weights = torch.randn(padded.shape)
    (padded * weights).sum().backward()
    assert torch.equal(rows.grad, weights.flatten(0, 1)[packing.index])


@pytest.mark.parametrize("fused", [True, False])
def test_packed_pass_equals_one_padded_pass_per_batch(encoder, fused):
    encoder.set_fused_attention(fused)
    batches = [b() for b in BATCHES]
    packed = encoder.forward_many(batches)
    for number, (batch, out) in enumerate(zip(batches, packed)):
        ref = encoder(**batch.as_kwargs())
        real = batch.attention_mask.bool()
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape
        close(out.last_hidden_state[real], ref.last_hidden_state[real], f"batch {number}")
        assert not out.last_hidden_state[~real].any()  # zeros at the padding
        close(out.pooler_output, ref.pooler_output, f"batch {number} pooler")


def test_packed_gradients_equal_the_padded_ones(encoder):
    batches = [b() for b in BATCHES]
    weights = [torch.randn(b.input_ids.shape + (encoder.config.hidden_size,)) for b in batches]

    def grads(outs):
        encoder.zero_grad(set_to_none=True)
        loss = sum(((o.last_hidden_state * w).sum(-1) * b.attention_mask).sum() + o.pooler_output.sum()
                   for o, w, b in zip(outs, weights, batches))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}
    loss, packed = grads(encoder.forward_many(batches))
    ref_loss, padded = grads([encoder(**b.as_kwargs()) for b in batches])
    close(loss, ref_loss, "loss")
    scale = max(g.abs().max().item() for g in padded.values())
    for name in padded:
        close(packed[name], padded[name], name, scale)


def test_a_batch_longer_than_the_positions_is_refused(encoder):
    long = encoded([70], 70)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder.forward_many([encoded([3], 3), long])


class NoStep:
    """An optimizer that leaves the gradients to be compared."""

    def __init__(self, params):
        self.params = list(params)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


@pytest.fixture
def step_setup(tiny_checkpoint, tiny_data):
    """The three tasks (STS bi-encoded: its pairs are 2B inputs), dropout off."""
    cfg = MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64,
                          progress=False, hidden_dropout_prob=0.0)
    s = run.setup(cfg)
    tasks = build_tasks(cfg, s.tokenizer, s.encoder.config, ("train",))
    model = run.build_model(cfg, s.encoder, tasks, s.device).eval()  # eval: dropout off
    model.train_encoder(True)
    drawn = [([t.collate(t.train[i:i + 2]) for i in (0, 2)], 4) for t in tasks]
    return model, tasks, drawn


def one_step(model, tasks, drawn, packed: bool, aggregator: str | None):
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    combiner = None if aggregator is None else Combiner(
        Combination(aggregator), PCGrad(shared, len(tasks)), len(tasks), 0)
    ctx = make_context(model, tasks, Dist(0, 1, 0, torch.device("cpu")), model.precision,
                       find_unused=False, combined=shared if combiner else [], packed=packed)
    values, gram, _ = train_step(ctx, tasks, drawn, NoStep(model.parameters()), combiner)
    return values, gram, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregator", [None, "pcgrad", "sum"])
def test_packed_step_equals_the_per_task_step(step_setup, aggregator):
    """Two micro-batches per task (accumulated), the plain summed backward or the
    combiner's per-task gradients (a packed run: from one packed pass)."""
    model, tasks, drawn = step_setup
    values, gram, grads = one_step(model, tasks, drawn, True, aggregator)
    ref_values, ref_gram, ref_grads = one_step(copy.deepcopy(model), tasks, drawn, False, aggregator)
    close(torch.tensor(values), torch.tensor(ref_values), "losses")
    if aggregator is not None:
        close(gram, ref_gram, "Gram matrix")
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name in grads:
        close(grads[name], ref_grads[name], name, scale)
