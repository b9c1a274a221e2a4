"""Balancers (engine/balancing.py): absolute scales on worked examples whose expected values
are derived by hand below (not by the code under test), state round trips, and
balanced_weights composing a balancer with an aggregator."""
import math

import pytest
import torch

from engine.aggregators import make_aggregator
from engine.balancing import BALANCERS, balanced_weights, make_balancer
from test_aggregators import gram, rand_grads, roundtrip

f64 = torch.float64


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=f64), rtol=1e-12, atol=1e-15)


def test_registry():
    assert set(BALANCERS) == {"none", "uncertainty", "dwa", "grad_norm", "famo"}
    assert all(make_balancer(n, 3).name == n for n in BALANCERS)
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("mgda", 3)  # an aggregator
    with pytest.raises(TypeError):
        make_balancer("dwa", 3, beta=0.5)


def test_none_scales_are_ones_whatever_the_input():
    bal = make_balancer("none", 3)
    cases = [(torch.tensor([5.0, 0.1, 2.0], dtype=f64), gram(rand_grads(3, 2, 0))),
             (torch.zeros(3, dtype=f64), torch.zeros(3, 3, dtype=f64))]
    for losses, g in cases:
        assert torch.equal(bal.scales(losses, g), torch.ones(3, dtype=f64))
        bal.end_epoch(losses.tolist())
    assert bal.state_dict() == {}


def uncertainty_by_hand(losses):
    """Expected scales of the first four steps, per task, for the defaults lr 1e-2, betas
    (0.9, 0.999), eps 1e-8. A step returns exp(-s) at the current s (s_0 = 0), then s takes
    an Adam step on g = 1 - exp(-s) L. Adam's moments written out as sums over the steps:
    m_t = sum_i 0.1 * 0.9^(t-i) g_i, v_t = sum_i 0.001 * 0.999^(t-i) g_i^2, bias-corrected
    by 1 - 0.9^t and 1 - 0.999^t."""
    lr, eps = 0.01, 1e-8
    out = [[], [], [], []]
    for l1, l2, l3 in zip(*losses):
        g1 = 1 - l1  # step 1: exp(-0) = 1; m^ = g1, v^ = g1^2: s moves by lr against sign(g1)
        s1 = -lr * g1 / (abs(g1) + eps)
        g2 = 1 - math.exp(-s1) * l2
        m2, v2 = 0.09 * g1 + 0.1 * g2, 0.000999 * g1 ** 2 + 0.001 * g2 ** 2
        s2 = s1 - lr * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + eps)
        g3 = 1 - math.exp(-s2) * l3
        m3 = 0.081 * g1 + 0.09 * g2 + 0.1 * g3
        v3 = 0.000998001 * g1 ** 2 + 0.000999 * g2 ** 2 + 0.001 * g3 ** 2
        s3 = s2 - lr * (m3 / 0.271) / (math.sqrt(v3 / 0.002997001) + eps)
        for row, s in zip(out, (0.0, s1, s2, s3)):
            row.append(math.exp(-s))
    return out


def test_uncertainty_worked_example_and_resume():
    # Task 3's loss 1 at step 1 is a zero gradient: Adam leaves its s at 0 (0 / (0 + eps)).
    losses = [[2.0, 0.5, 1.0], [3.0, 0.5, 2.0], [1.0, 4.0, 0.5], [1.0, 1.0, 1.0]]
    expected = uncertainty_by_hand(losses[:3])
    assert expected[1][2] == 1.0 and expected[1][0] < 1 < expected[1][1]  # s = (0.01, -0.01, 0)
    bal = make_balancer("uncertainty", 3)
    for step in range(2):
        close(bal.scales(torch.tensor(losses[step], dtype=f64), None), expected[step])
    resumed = make_balancer("uncertainty", 3)
    resumed.load_state_dict(roundtrip(bal.state_dict()))
    for step in (2, 3):  # step 4's scale depends on the moments carried through the resume
        loss = torch.tensor(losses[step], dtype=f64)
        ours, theirs = bal.scales(loss, None), resumed.scales(loss, None)
        close(ours, expected[step])
        assert torch.equal(ours, theirs)


def test_dwa_worked_example_and_resume():
    """Default T = 2: scales 3 softmax(r / 2), r_k = L_k(t-1) / L_k(t-2), 1 where L_k(t-2) <= 0."""
    bal = make_balancer("dwa", 3)
    anything = torch.tensor([9.0, 0.1, 3.0], dtype=f64), gram(rand_grads(3, 3, 0))
    assert torch.equal(bal.scales(*anything), torch.ones(3, dtype=f64))  # epoch 1: no history
    bal.end_epoch([1.0, 2.0, 0.0])
    assert torch.equal(bal.scales(*anything), torch.ones(3, dtype=f64))  # epoch 2: one epoch
    bal.end_epoch([0.5, 2.0, 0.7])
    # epoch 3: r = (0.5 / 1, 2 / 2, 1 (L_3 was 0)) = (0.5, 1, 1): 3 e^(r/2) / sum e^(r/2)
    total = math.exp(0.25) + 2 * math.exp(0.5)
    epoch3 = [3 * math.exp(0.25) / total, 3 * math.exp(0.5) / total, 3 * math.exp(0.5) / total]
    resumed = make_balancer("dwa", 3)
    resumed.load_state_dict(roundtrip(bal.state_dict()))
    for b in (bal, resumed):
        close(b.scales(*anything), epoch3)
        close(b.scales(torch.ones(3, dtype=f64), None), epoch3)  # the same all epoch
        b.end_epoch([0.25, 1.0, 1.4])
    # epoch 4: only the last two epochs count, r = (0.25/0.5, 1/2, 1.4/0.7) = (0.5, 0.5, 2)
    total = 2 * math.exp(0.25) + math.exp(1.0)
    epoch4 = [3 * math.exp(0.25) / total, 3 * math.exp(0.25) / total, 3 * math.exp(1.0) / total]
    close(bal.scales(*anything), epoch4)
    assert torch.equal(resumed.scales(*anything), bal.scales(*anything))


def test_grad_norm_worked_example_and_resume():
    """Default beta 0.9: EMA of the norms sqrt(G_kk); scales = (mean over live tasks of the
    corrected EMA) / (the task's corrected EMA); a task whose EMA is 0 gets 1 and is left
    out of the mean. Off-diagonal entries play no part."""
    g1 = torch.tensor([[4.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=f64)
    g2 = torch.tensor([[16.0, 2.0, 0.0], [2.0, 1.0, 1.0], [0.0, 1.0, 9.0]], dtype=f64)
    g3 = torch.diag(torch.tensor([1.0, 4.0, 0.0], dtype=f64))
    bal = make_balancer("grad_norm", 3)
    # step 1: norms (2, 1, 0); EMA 0.1 * norms = (0.2, 0.1, 0), / (1 - 0.9) = (2, 1, 0);
    # live tasks 1, 2 with mean 1.5: scales (1.5 / 2, 1.5 / 1, 1)
    close(bal.scales(None, g1), [0.75, 1.5, 1.0])
    # step 2: norms (4, 1, 3); EMA 0.9 (0.2, 0.1, 0) + 0.1 (4, 1, 3) = (0.58, 0.19, 0.3),
    # / (1 - 0.81); all live, mean 1.07 / 3 / 0.19: scales (1.07 / 3) / EMA
    close(bal.scales(None, g2), [1.07 / 3 / 0.58, 1.07 / 3 / 0.19, 1.07 / 3 / 0.3])
    state = roundtrip(bal.state_dict())
    close(state["average"], [0.58, 0.19, 0.3])
    assert state["steps"] == 2
    resumed = make_balancer("grad_norm", 3)
    resumed.load_state_dict(state)
    # step 3: norms (1, 2, 0); EMA 0.9 (0.58, 0.19, 0.3) + 0.1 (1, 2, 0) = (0.622, 0.371, 0.27):
    # task 3's gradient is 0 now but its EMA is not, so it stays live
    expected = [1.263 / 3 / 0.622, 1.263 / 3 / 0.371, 1.263 / 3 / 0.27]
    ours = bal.scales(None, g3)
    close(ours, expected)
    assert torch.equal(resumed.scales(None, g3), ours)


def test_balanced_weights_worked_example():
    """grad_norm then MGDA: MGDA sees G' = diag(s) G diag(s) and its two-task min-norm point
    w'_1 = (G'_22 - G'_12) / (G'_11 + G'_22 - 2 G'_12); the raw weights are w' * s."""
    agg, bal = make_aggregator("mgda", 2), make_balancer("grad_norm", 2)
    losses = torch.tensor([0.7, 1.3], dtype=f64)
    # step 1: norms (1, 2) -> s = (1.5, 0.75); G' = [[2.25, -1.125], [-1.125, 2.25]]: equal
    # norms, so w' = (1/2, 1/2) and w = (0.75, 0.375) (MGDA on raw G would give (5/7, 2/7))
    g1 = torch.tensor([[1.0, -1.0], [-1.0, 4.0]], dtype=f64)
    close(balanced_weights(g1, losses, agg, bal), [0.75, 0.375])
    # step 2: norms (2, 2); EMA 0.9 (0.1, 0.2) + 0.1 (2, 2) = (0.29, 0.38) -> s = 0.335 / EMA
    s1, s2 = 0.335 / 0.29, 0.335 / 0.38
    a, b, c = 4 * s1 * s1, 4 * s2 * s2, 1 * s1 * s2  # G' from G = [[4, 1], [1, 4]]
    w1 = (b - c) / (a + b - 2 * c)
    assert 0 < w1 < 1  # the interior of the segment: the formula needs no clamp
    g2 = torch.tensor([[4.0, 1.0], [1.0, 4.0]], dtype=f64)
    close(balanced_weights(g2, losses, agg, bal), [w1 * s1, (1 - w1) * s2])


def test_grad_norm_balancer_equalises_norms():
    g = torch.tensor([[7.4, 0.0], [0.0, 4.0], [15.3, 1.0], [0.0, 0.0]], dtype=f64)
    bal = make_balancer("grad_norm", 4, beta=0.9)
    for _ in range(50):
        s = bal.scales(None, gram(g))
    scaled = (s[:, None] * g).norm(dim=1)
    torch.testing.assert_close(scaled[:3], scaled[:3].mean().expand(3))
    assert s[3] == 1
    first = make_balancer("grad_norm", 4).scales(None, gram(g))  # bias correction: exact at once
    torch.testing.assert_close(first, s)


def test_dwa_formula():
    bal = make_balancer("dwa", 2, temperature=2.0)
    assert torch.equal(bal.scales(None, None), torch.ones(2, dtype=f64))
    bal.end_epoch([1.0, 2.0])
    assert torch.equal(bal.scales(None, None), torch.ones(2, dtype=f64))
    bal.end_epoch([0.5, 1.8])
    bal.end_epoch([0.25, 1.62])  # only the last two epochs count: r = (0.5, 0.9)
    e = torch.exp(torch.tensor([0.5, 0.9], dtype=f64) / 2)
    torch.testing.assert_close(bal.scales(None, None), 2 * e / e.sum())


def test_uncertainty_moves_log_variance_to_log_loss():
    losses = torch.tensor([0.2, 1.0, 3.0], dtype=f64)
    bal = make_balancer("uncertainty", 3, lr=0.05)
    assert torch.equal(bal.scales(losses, None), torch.ones(3, dtype=f64))
    for _ in range(800):
        bal.scales(losses, None)
    torch.testing.assert_close(bal.log_vars, losses.log(), atol=0.02, rtol=0)


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_balancer_state_resumes(name):
    g, losses = gram(rand_grads(3, 3, 0)), torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    bal = make_balancer(name, 3)
    for epoch in range(3):
        bal.scales(losses * (epoch + 1), g)
        bal.end_epoch((losses / (epoch + 1)).tolist())
    resumed = make_balancer(name, 3)
    resumed.load_state_dict(roundtrip(bal.state_dict()))
    assert torch.equal(resumed.scales(losses, g), bal.scales(losses, g))


def test_balanced_weights_run_the_aggregator_on_scaled_gradients():
    g, losses = rand_grads(3, 4, 6), torch.ones(3, dtype=f64)
    s = make_balancer("grad_norm", 3).scales(None, gram(g))
    w = balanced_weights(gram(g), losses, make_aggregator("upgrad", 3),
                         make_balancer("grad_norm", 3))
    scaled = s[:, None] * g
    expected = make_aggregator("upgrad", 3).weights(gram(scaled), None) @ scaled
    torch.testing.assert_close(w @ g, expected)
    w = balanced_weights(gram(g), losses, make_aggregator("sum", 3), make_balancer("none", 3))
    assert torch.equal(w, torch.ones(3, dtype=f64))
