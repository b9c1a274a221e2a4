"""The word embedding's row-built gradient (engine/row_gradients.py) is torch's dense one,
bit for bit, in every way a step produces it; so are the trained weights."""
import os

import pytest
import torch
from torch import nn

import multitask_classifier as mtc
from engine import build
from engine.row_gradients import RowGradEmbedding, use_row_gradients
from optimizer import AdamW
from test_training import run_args

V, H, PAD = 200, 24, 0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)  # -0.0 and 0.0 differ, NaNs compare


def pair():
    reference = nn.Embedding(V, H, padding_idx=PAD)
    rows = RowGradEmbedding.wrapping(nn.Embedding(V, H, padding_idx=PAD))
    rows.weight.data.copy_(reference.weight.data)
    return reference, rows


def lookups(count: int, high: int, generator: torch.Generator) -> list:
    """`count` lookups of ids below `high` (so they overlap), padding included, each with
    a random upstream gradient."""
    out = []
    for _ in range(count):
        shape = tuple(int(n) for n in torch.randint(1, 12, (2,), generator=generator))
        ids = torch.randint(0, high, shape, generator=generator)
        ids[0, -1] = PAD
        out.append((ids, torch.randn(*shape, H, generator=generator)))
    return out


def backward(embedding: nn.Module, calls: list, mix: torch.Tensor) -> None:
    # a nonlinearity after the lookup, as the encoder has: each lookup its own backward node
    sum(((embedding(ids) @ mix).tanh() * up).sum() for ids, up in calls).backward()


def test_the_gradient_is_torchs_bit_for_bit_in_every_way_a_step_makes_it():
    reference, rows = pair()
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(H, H, generator=g)
    seen = []

    def check(_):
        seen.append(bits(rows.weight.grad).clone())  # what PCGrad's hook reads, then clears
        rows.weight.grad = None
    for step in range(12):
        first, later = lookups(3, 40 + 10 * step, g), lookups(2, V, g)
        for embedding in (reference, rows):
            embedding.weight.grad = None
            backward(embedding, first, mix)  # three lookups, one backward (a mix step)
            if step % 3 == 1:  # a second micro-batch adds other rows in place
                backward(embedding, later, mix)
        assert torch.equal(bits(reference.weight.grad), bits(rows.weight.grad)), step
        assert rows.weight.grad.data_ptr() == rows.grad_buffer.data_ptr()
        if step % 4 == 3:  # per-task backward passes (PCGrad's): each read, then cleared
            handle = rows.weight.register_post_accumulate_grad_hook(check)
            for ids, up in first:
                reference.weight.grad = rows.weight.grad = None  # as PCGrad.backward does
                backward(reference, [(ids, up)], mix)
                backward(rows, [(ids, up)], mix)
                assert torch.equal(bits(reference.weight.grad), seen.pop()), step
            handle.remove()


def test_adamw_steps_match_and_a_frozen_or_eval_lookup_is_plain():
    reference, rows = pair()
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(H, H, generator=g)
    optimizers = [AdamW(e.parameters(), lr=1e-2, weight_decay=0.1) for e in (reference, rows)]
    for step in range(6):
        calls = lookups(3, V, g)
        for embedding, optimizer in zip((reference, rows), optimizers):
            optimizer.zero_grad(set_to_none=True)
            backward(embedding, calls, mix)
            optimizer.step()
        assert torch.equal(bits(reference.weight), bits(rows.weight)), step
    ids = calls[0][0]
    with torch.no_grad():
        assert torch.equal(rows(ids), reference(ids))
    rows.weight.requires_grad_(False)
    assert rows(ids).grad_fn is None


def test_it_is_used_on_one_cpu_process_with_a_trainable_embedding_only():
    def encoder():
        module = nn.Module()
        module.word_embedding = nn.Embedding(V, H, padding_idx=PAD)
        return module
    cpu = torch.device("cpu")
    assert use_row_gradients(plain := encoder(), cpu, distributed=False)
    assert isinstance(plain.word_embedding, RowGradEmbedding)
    assert not use_row_gradients(plain, cpu, distributed=False)  # once
    assert not use_row_gradients(encoder(), cpu, distributed=True)
    assert not use_row_gradients(encoder(), torch.device("meta"), distributed=False)
    frozen = encoder()
    frozen.word_embedding.requires_grad_(False)
    assert not use_row_gradients(frozen, cpu, distributed=False)


@pytest.mark.parametrize("extra", [["--pcgrad"], ["--grad_accumulation", "2"],
                                   ["--mode", "seq", "--weight_decay", "0.1"]],
                         ids=["pcgrad", "sum-accumulated", "seq"])
def test_training_with_row_gradients_changes_no_number(tiny_checkpoint, tiny_data, tmp_path,
                                                       monkeypatch, extra):
    used = []
    monkeypatch.setattr(build, "use_row_gradients", lambda *a: used.append(use_row_gradients(*a)))
    rows = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "rows", "--epochs", "2", *extra))
    monkeypatch.setattr(build, "use_row_gradients", lambda *a: False)
    dense = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "dense", "--epochs", "2", *extra))
    assert used == [True]
    a = torch.load(os.path.join(rows, "best.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(dense, "best.pt"), weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(bits(a[key]), bits(b[key])), key
