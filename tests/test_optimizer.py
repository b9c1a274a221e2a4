import math

import pytest
import torch

from optimizer import AdamW


def run(opt_cls, grads, init, **kwargs):
    p = torch.nn.Parameter(init.clone())
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_two_steps_by_hand():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-6, 0.01
    p0 = torch.tensor([1.0, -2.0])
    g1, g2 = torch.tensor([0.5, -1.0]), torch.tensor([-0.2, 0.3])
    got = run(AdamW, [g1, g2], p0, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p, m, v = p0.tolist(), [0.0, 0.0], [0.0, 0.0]
    for t, g in enumerate([g1.tolist(), g2.tolist()], start=1):
        alpha = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            p[i] = p[i] - alpha * m[i] / (math.sqrt(v[i]) + eps)
            p[i] = p[i] - lr * wd * p[i]
    torch.testing.assert_close(got, torch.tensor(p), rtol=0, atol=1e-6)


def test_matches_torch_adamw_without_decay():
    torch.manual_seed(0)
    init = torch.randn(50)
    grads = [torch.randn(50) for _ in range(20)]
    ours = run(AdamW, grads, init, lr=1e-2, eps=1e-8)
    theirs = run(torch.optim.AdamW, grads, init, lr=1e-2, eps=1e-8, weight_decay=0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_without_bias_correction_first_step_is_lr_scaled():
    got = run(AdamW, [torch.tensor([4.0])], torch.tensor([0.0]), lr=1.0, betas=(0.9, 0.999),
              eps=0.0, correct_bias=False)
    # m = 0.4, v = 0.016: step = m / sqrt(v)
    torch.testing.assert_close(got, torch.tensor([-0.4 / math.sqrt(0.016)]))


def test_param_groups_keep_their_own_settings():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = AdamW([{"params": [a], "lr": 0.0}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(1), torch.ones(1)
    opt.step()
    assert a.item() == 1.0 and b.item() < 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.999)}, "beta"),
    ({"betas": (0.9, -0.1)}, "beta"), ({"eps": -1.0}, "epsilon"),
    ({"weight_decay": -0.1}, "weight_decay")])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW(emb.parameters()).step()


def test_skips_parameters_without_gradient():
    p = torch.nn.Parameter(torch.ones(2))
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    assert p.tolist() == [1.0, 1.0]
