"""Aggregator weights by value on worked examples (K = 2 or 3) whose answers are derived
by hand below from each method's definition, not by the code under test. Here g_k are
written out as vectors and G = [g_i . g_j]; test_aggregators.py holds the property checks."""
import math
import random

import pytest
import torch

from engine.aggregators import make_aggregator

f64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=f64)


def close(actual, expected, rtol=1e-12):
    torch.testing.assert_close(actual, t(expected), rtol=rtol, atol=1e-14)


def weights(name, g, **options):
    return make_aggregator(name, len(g), **options).weights(g, torch.ones(len(g), dtype=f64))


@pytest.mark.parametrize("g", [t([[1.0, -1.0], [-1.0, 4.0]]), torch.zeros(3, 3, dtype=f64)])
def test_sum_is_ones(g):
    assert torch.equal(weights("sum", g), torch.ones(len(g), dtype=f64))


# g1 = (1, 0, 0), g2 = (-1, 1, 0), g3 = (-1, 0, 1): g1 conflicts with g2 and g3 (dots -1),
# g2 . g3 = 1. Task 1 in the order (2, 3): g1 . g2 = -1 -> g1 + g2 / 2 = (1/2, 1/2, 0), whose
# dot with g3 is -1/2 -> + (1/2) / 2 g3: coefficients (1, 1/2, 1/4); order (3, 2): (1, 1/4, 1/2).
# Task 2: g2 + g1 = (0, 1, 0) is orthogonal to g3, and g2 . g3 > 0: (1, 1, 0) in either order;
# task 3 likewise (1, 0, 1). Sum over tasks: (3, 3/2, 5/4) or (3, 5/4, 3/2).
PCGRAD_G = t([[1.0, -1.0, -1.0], [-1.0, 2.0, 1.0], [-1.0, 1.0, 2.0]])
PCGRAD_SUMS = {(1, 2): [3.0, 1.5, 1.25], (2, 1): [3.0, 1.25, 1.5]}


def task1_orders(seed, steps):
    """Replays the draw: per step, one shuffle of the other tasks for each task in turn."""
    rng, firsts = random.Random(seed), []
    for _ in range(steps):
        orders = [[j for j in range(3) if j != i] for i in range(3)]
        for order in orders:
            rng.shuffle(order)
        firsts.append(tuple(orders[0]))
    return firsts


def test_pcgrad_worked_example_follows_its_seed():
    seen = set()
    for seed in range(4):
        for reduction, scale in (("sum", 1.0), ("mean", 1 / 3)):
            agg = make_aggregator("pcgrad", 3, seed=seed, reduction=reduction)
            for order in task1_orders(seed, 3):  # later steps continue the same stream
                close(agg.weights(PCGRAD_G, None), [x * scale for x in PCGRAD_SUMS[order]])
                seen.add(order)
    assert seen == set(PCGRAD_SUMS)  # both orders drawn: the seed decides the answer


def test_mgda_worked_examples():
    # Orthogonal: min sum_k G_kk w_k^2 on the simplex; Lagrange: w_k ∝ 1 / G_kk.
    close(weights("mgda", torch.diag(t([1.0, 2.0, 4.0]))), [4 / 7, 2 / 7, 1 / 7])
    close(weights("mgda", torch.diag(t([1e3, 2e3, 4e3]))), [4 / 7, 2 / 7, 1 / 7])  # scale-free
    # Two tasks: the min-norm point of the segment, w_1 = (G22 - G12) / (G11 + G22 - 2 G12)
    # clamped to [0, 1]. g1 = (1, 0), g2 = (0, 2): 4 / 5, so d = (4/5, 2/5), g_k . d = 4/5 both.
    close(weights("mgda", t([[1.0, 0.0], [0.0, 4.0]])), [0.8, 0.2])
    # g1 = (1, 0), g2 = (2, 1): (5 - 2) / (1 + 5 - 4) = 3/2 -> 1: d = g1, and g2 . g1 = 2 >= 1.
    close(weights("mgda", t([[1.0, 2.0], [2.0, 5.0]])), [1.0, 0.0])


def test_imtl_g_worked_examples():
    # d = a g1 + (1 - a) g2 with equal projections on u_k = g_k / ||g_k||. g1 = (1, 0),
    # g2 = (1, 1): d . u1 = a + (1 - a) = 1, d . u2 = (a + 2 (1 - a)) / sqrt 2 -> a = 2 - sqrt 2.
    close(weights("imtl_g", t([[1.0, 1.0], [1.0, 2.0]])), [2 - math.sqrt(2), math.sqrt(2) - 1])
    # Orthogonal, norms (1, 2, 4): d . u_k = a_k ||g_k|| equal -> a ∝ (1, 1/2, 1/4), sum 1.
    close(weights("imtl_g", torch.diag(t([1.0, 4.0, 16.0]))), [4 / 7, 2 / 7, 1 / 7])
    # A zero gradient: the generalisation alpha ∝ pinv(G) ||g|| = (1, 2/4, 0), sum 1.
    close(weights("imtl_g", torch.diag(t([1.0, 4.0, 0.0]))), [2 / 3, 1 / 3, 0.0])


def test_cagrad_worked_examples():
    """g1 = (1, 0), g2 = (0, 2): g0 = (1/2, 1), ||g0||^2 = 5/4, r = c ||g0||. The inner
    problem over g_w = (w, 2 (1 - w)): f(w) = g_w . g0 + r ||g_w|| = 2 - 3w/2 + r ||g_w||,
    f'(w) = -3/2 + r (5w - 4) / ||g_w||, where (5w - 4) / ||g_w|| rises to 1 at w = 1.
    The update d = g0 + r g_w / ||g_w||, divided by 1 + c^2 unless rescale=False."""
    g = t([[1.0, 0.0], [0.0, 4.0]])
    # default c = 0.4: r = 0.4 sqrt(5/4) < 3/2, f' < 0 on [0, 1] -> w = 1, g_w = g1 (norm 1)
    r = 0.4 * math.sqrt(1.25)
    close(weights("cagrad", g), [(0.5 + r) / 1.16, 0.5 / 1.16])
    close(weights("cagrad", g, c=0.4, rescale=False), [0.5 + r, 0.5])
    # c = 2: r = sqrt 5, f' = 0 inside: 5 (5w - 4)^2 = 9/4 (5w^2 - 8w + 4), 5w > 4, i.e.
    # 113.75 w^2 - 182 w + 71 = 0, the larger root
    w = (182 + math.sqrt(182 ** 2 - 4 * 113.75 * 71)) / (2 * 113.75)
    r, norm = math.sqrt(5), math.sqrt(w ** 2 + 4 * (1 - w) ** 2)
    expected = [0.5 + r * w / norm, 0.5 + r * (1 - w) / norm]
    close(weights("cagrad", g, c=2.0, rescale=False), expected, rtol=1e-9)
    close(weights("cagrad", g, c=0.0), [0.5, 0.5])  # c = 0: the mean


def test_nash_mtl_worked_examples():
    # Orthogonal: alpha_k (G alpha)_k = G_kk alpha_k^2 = 1 -> alpha_k = 1 / ||g_k||; exactly
    # 1 / sqrt(G_kk + ridge ||G||_F) with the default ridge 1e-10.
    g = torch.diag(t([1.0, 4.0, 16.0]))
    fro = math.sqrt(1 + 16 + 256)
    close(weights("nash_mtl", g), [1 / math.sqrt(x + 1e-10 * fro) for x in (1.0, 4.0, 16.0)])
    close(weights("nash_mtl", g), [1.0, 0.5, 0.25], rtol=1e-9)
    # ||d||^2 = alpha . G alpha = K = 3: max_norm 1 divides by sqrt 3
    close(weights("nash_mtl", g, max_norm=1.0), [x / math.sqrt(3) for x in (1.0, 0.5, 0.25)],
          rtol=1e-9)
    # A zero gradient gets 0; the others bargain alone: (1/2, 0, 1)
    close(weights("nash_mtl", torch.diag(t([4.0, 0.0, 1.0]))), [0.5, 0.0, 1.0], rtol=1e-9)
    # G = [[1, 1/2], [1/2, 1]]: by symmetry alpha = (a, a), a^2 (3/2) = 1
    close(weights("nash_mtl", t([[1.0, 0.5], [0.5, 1.0]])), [math.sqrt(2 / 3)] * 2, rtol=1e-9)
    agg, eye = make_aggregator("nash_mtl", 3, update_every=2), torch.eye(3, dtype=f64)
    close(agg.weights(g, None), [1.0, 0.5, 0.25], rtol=1e-9)
    close(agg.weights(eye, None), [1.0, 0.5, 0.25], rtol=1e-9)  # step 2 reuses step 1's alpha
    close(agg.weights(eye, None), [1.0, 1.0, 1.0], rtol=1e-9)  # step 3 solves again


def test_aligned_mtl_worked_examples():
    # G = diag(1, 4, 16): V = I, w = B 1 = sqrt(l) L^{-1/2} 1 = sqrt(l) (1, 1/2, 1/4) with
    # l = l_min 1, the median 4, or the mean 7 (scale_mode min / median / rmse)
    g = torch.diag(t([1.0, 4.0, 16.0]))
    for mode, scale in (("min", 1.0), ("median", 2.0), ("rmse", math.sqrt(7))):
        close(weights("aligned_mtl", g, scale_mode=mode), [scale, scale / 2, scale / 4])
    # G = [[2, 1], [1, 2]]: eigenpairs 1, (1, -1)/sqrt 2 and 3, (1, 1)/sqrt 2. B 1 keeps only
    # the (1, 1) part: sqrt(1) (1 / sqrt 3) (1, 1)
    close(weights("aligned_mtl", t([[2.0, 1.0], [1.0, 2.0]])), [1 / math.sqrt(3)] * 2)


def test_upgrad_and_dualproj_worked_examples():
    """g1 = (1, 0), g2 = (-2, 1), G = [[1, -2], [-2, 5]]. Projecting sum u_k g_k onto the
    dual cone is min v . G v s.t. v >= u (KKT: (G v)_k = 0 where v_k > u_k, >= 0 at u_k)."""
    g = t([[1.0, -2.0], [-2.0, 5.0]])
    # UPGrad, u = e1 / 2: v = (1/2, x), (G v)_2 = -1 + 5x = 0 -> x = 1/5, (G v)_1 = 1/10 >= 0;
    # u = e2 / 2: v = (x, 1/2), x - 1 = 0 -> x = 1, (G v)_2 = 1/2 >= 0. Sum (3/2, 7/10).
    close(weights("upgrad", g), [1.5, 0.7])
    # DualProj, u = (1/2, 1/2): v = (1, 1/2) as above (the mean d = (-1/2, 1/2) loses its
    # conflict with g1: d = (0, 1/2))
    close(weights("dualproj", g), [1.0, 0.5])
    # A third task orthogonal to both, K = 3: u = e1 / 3 -> (1/3, 2/15, 0); e2 / 3 ->
    # (2/3, 1/3, 0); e3 / 3 -> (0, 0, 1/3). Sum (1, 7/15, 1/3).
    g3 = t([[1.0, -2.0, 0.0], [-2.0, 5.0, 0.0], [0.0, 0.0, 1.0]])
    close(weights("upgrad", g3), [1.0, 7 / 15, 1 / 3])
    close(weights("upgrad", 100 * g3), [1.0, 7 / 15, 1 / 3])  # scale-free


def test_rlw_follows_its_seed():
    for seed in (0, 7):
        draws = torch.Generator().manual_seed(seed)  # the draw: N(0, I), float64, per step
        agg = make_aggregator("rlw", 3, seed=seed)
        for step in range(3):
            z = torch.randn(3, generator=draws, dtype=f64).tolist()
            total = sum(math.exp(x) for x in z)
            close(agg.weights(torch.eye(3, dtype=f64) * step, None),
                  [math.exp(x) / total for x in z])
