import io
import random

import pytest
import torch

from engine.aggregators import AGGREGATORS, make_aggregator
from pcgrad import project_conflicting

NAMES = sorted(AGGREGATORS)
f64 = torch.float64


def gram(grads):
    return grads @ grads.T


def rand_grads(k, p, seed):
    """Few dimensions so that random gradients often conflict."""
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=f64)


def dykstra(x, grads, iters=20000):
    """Projection of x onto {y : g_k . y >= 0 for all k}, directly in P dimensions (plain
    floats: thousands of tiny torch ops would take seconds)."""
    gs, y = grads.tolist(), x.tolist()
    fix = [[0.0] * len(y) for _ in gs]
    for _ in range(iters):
        before = y
        for g, f in zip(gs, fix):
            z = [a + b for a, b in zip(y, f)]
            step = min(sum(a * b for a, b in zip(z, g)), 0.0) / sum(a * a for a in g)
            y = [a - step * b for a, b in zip(z, g)]
            f[:] = [a - b for a, b in zip(z, y)]
        if max(abs(a - b) for a, b in zip(y, before)) < 1e-15:
            break
    return torch.tensor(y, dtype=f64)


def ternary(f, lo=0.0, hi=1.0, iters=200):
    """argmin of a convex function on [lo, hi]."""
    for _ in range(iters):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (a, hi) if f(a) > f(b) else (lo, b)
    return (lo + hi) / 2


def test_registry():
    assert set(NAMES) == {"sum", "pcgrad", "mgda", "imtl_g", "cagrad", "nash_mtl",
                          "aligned_mtl", "upgrad", "dualproj", "rlw", "fairgrad", "gradvac"}
    assert all(make_aggregator(n, 3).name == n for n in NAMES)
    with pytest.raises(ValueError, match="unknown aggregator"):
        make_aggregator("famo", 3)  # a balancer
    with pytest.raises(TypeError):
        make_aggregator("mgda", 3, c=0.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grads", [
    [[0.0, 0.0], [-1.0, 0.5], [1.0, 1.0]],  # a zero gradient
    [[1.0, 2.0], [1.0, 2.0], [-1.0, -2.0]],  # rank one, opposite
    [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # nothing at all
    [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]],  # Pareto-stationary
])
def test_degenerate_gradients_give_finite_weights(name, grads):
    g = torch.tensor(grads, dtype=f64)
    w = make_aggregator(name, 3).weights(gram(g), torch.ones(3, dtype=f64))
    assert w.shape == (3,) and w.dtype == f64 and torch.isfinite(w).all()


def test_sum_and_pcgrad_match_the_vector_versions():
    g = rand_grads(3, 4, 0)
    torch.testing.assert_close(make_aggregator("sum", 3).weights(gram(g), None) @ g, g.sum(0))
    for reduction in ("sum", "mean"):
        agg = make_aggregator("pcgrad", 3, seed=5, reduction=reduction)
        expected = project_conflicting(g, random.Random(5), reduction)
        torch.testing.assert_close(agg.weights(gram(g), None) @ g, expected)


def test_mgda_two_tasks_closed_form_and_min_norm_conditions():
    g1, g2 = torch.tensor([1.0, 1.0], dtype=f64), torch.tensor([-2.0, 0.5], dtype=f64)
    w1 = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1)
    w = make_aggregator("mgda", 2).weights(gram(torch.stack([g1, g2])), None)
    torch.testing.assert_close(w, torch.stack([w1, 1 - w1]))
    for seed in range(5):  # min-norm d: g_k . d >= ||d||^2, equality where w_k > 0
        g = rand_grads(4, 3, seed)
        w = make_aggregator("mgda", 4).weights(gram(g), None)
        d = w @ g
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
        assert (g @ d >= d @ d - 1e-9).all()
        torch.testing.assert_close((g @ d)[w > 1e-9], (d @ d).expand(int((w > 1e-9).sum())))


def test_imtl_g_equal_projections_and_paper_closed_form():
    g = rand_grads(3, 5, 1)
    w = make_aggregator("imtl_g", 3).weights(gram(g), None)
    units = g / g.norm(dim=1, keepdim=True)
    proj = units @ (w @ g)
    torch.testing.assert_close(proj, proj[0].expand(3))
    d_mat, u_mat = g[0] - g[1:], units[0] - units[1:]  # (K-1, P), as in the paper
    rest = g[0] @ u_mat.T @ torch.linalg.inv(d_mat @ u_mat.T)
    torch.testing.assert_close(w, torch.cat([1 - rest.sum(0, keepdim=True), rest]))
    # a zero gradient: the pinv generalisation still equalises the other projections
    g[2] = 0
    w = make_aggregator("imtl_g", 3).weights(gram(g), None)
    proj = units[:2] @ (w @ g)
    torch.testing.assert_close(proj[0], proj[1])


def test_cagrad():
    g = rand_grads(3, 4, 2)
    torch.testing.assert_close(make_aggregator("cagrad", 3, c=0.0).weights(gram(g), None),
                               torch.full((3,), 1 / 3, dtype=f64))
    g2 = torch.tensor([[2.0, 0.5, 0.0], [-1.0, 1.0, 0.3]], dtype=f64)  # conflicting
    g0, c = g2.mean(0), 0.4
    r = c * g0.norm()

    def inner(t):  # a . w + r ||g_w|| in P dimensions, w = (t, 1 - t)
        gw = t * g2[0] + (1 - t) * g2[1]
        return float(gw @ g0 + r * gw.norm())
    t = ternary(inner)
    gw = t * g2[0] + (1 - t) * g2[1]
    expected = (g0 + r / gw.norm() * gw) / (1 + c ** 2)
    w = make_aggregator("cagrad", 2, c=c).weights(gram(g2), None)
    torch.testing.assert_close(w @ g2, expected, atol=1e-8, rtol=1e-8)
    # CAGrad's primal: d maximises min_k g_k . d over the ball ||d - g0|| <= c ||g0||
    for g in (g, rand_grads(4, 2, 7)):  # the second: rank-deficient G
        g0 = g.mean(0)
        d = make_aggregator("cagrad", len(g), rescale=False).weights(gram(g), None) @ g
        assert abs((d - g0).norm() - 0.4 * g0.norm()) < 1e-9
        dirs = torch.randn(2000, g.shape[1], generator=torch.Generator().manual_seed(0), dtype=f64)
        others = g0 + 0.4 * g0.norm() * dirs / dirs.norm(dim=1, keepdim=True)
        assert (others @ g.T).min(1).values.max() <= (g @ d).min() + 1e-12


def test_nash_mtl_solves_the_bargaining_equations():
    g = rand_grads(3, 6, 3)
    agg = make_aggregator("nash_mtl", 3)
    alpha = agg.weights(gram(g), None)
    assert (alpha > 0).all()
    torch.testing.assert_close(gram(g) @ alpha, 1 / alpha, rtol=1e-6, atol=0)
    torch.testing.assert_close((alpha @ g).norm() ** 2, torch.tensor(3.0, dtype=f64))
    capped = make_aggregator("nash_mtl", 3, max_norm=1.0).weights(gram(g), None)
    torch.testing.assert_close(capped, alpha / 3 ** 0.5)
    g[1] = 0  # a zero gradient: alpha 0 there, the others bargain alone
    alpha = make_aggregator("nash_mtl", 3).weights(gram(g), None)
    sub = gram(g[[0, 2]])
    assert alpha[1] == 0
    torch.testing.assert_close(sub @ alpha[[0, 2]], 1 / alpha[[0, 2]], rtol=1e-6, atol=0)


def test_nash_mtl_update_every_reuses_alpha():
    agg = make_aggregator("nash_mtl", 2, update_every=2)
    first = agg.weights(gram(rand_grads(2, 3, 0)), None)
    torch.testing.assert_close(agg.weights(gram(rand_grads(2, 3, 1)), None), first)
    assert not torch.allclose(agg.weights(gram(rand_grads(2, 3, 1)), None), first)


def test_aligned_mtl():
    g = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=f64)  # orthogonal, equal norms
    torch.testing.assert_close(make_aggregator("aligned_mtl", 2).weights(gram(g), None),
                               torch.ones(2, dtype=f64))
    for g, dropped in ((rand_grads(3, 5, 4), 0), (rand_grads(3, 2, 5), 1)):  # rank 3, rank 2
        w = make_aggregator("aligned_mtl", 3).weights(gram(g), None)
        values, vectors = torch.linalg.eigh(gram(g))
        values, vectors = values[dropped:], vectors[:, dropped:]
        b = values[0].sqrt() * (vectors / values.sqrt()) @ vectors.T
        aligned = b.T @ g  # (K, P): g_j' = sum_k B[k, j] g_k, orthogonal with norm sqrt(l_min)
        torch.testing.assert_close(gram(aligned), values[0] * vectors @ vectors.T)
        torch.testing.assert_close(w @ g, aligned.sum(0))


@pytest.mark.parametrize("k, p, seed", [(3, 4, 0), (3, 4, 1), (3, 4, 2), (4, 2, 3), (4, 2, 4)])
def test_upgrad_and_dualproj_match_projections_in_p_dimensions(k, p, seed):
    g = rand_grads(k, p, seed)  # (4, 2): rank-deficient G
    up = make_aggregator("upgrad", k).weights(gram(g), None) @ g
    expected = sum(dykstra(g[i] / k, g) for i in range(k))
    torch.testing.assert_close(up, expected, atol=1e-7, rtol=1e-7)
    assert (g @ up >= -1e-9).all()
    dual = make_aggregator("dualproj", k).weights(gram(g), None) @ g
    torch.testing.assert_close(dual, dykstra(g.mean(0), g), atol=1e-7, rtol=1e-7)


def test_upgrad_is_the_mean_without_conflict_and_agrees_when_conflicting():
    g = torch.tensor([[1.0, 0.0, 1.0], [0.5, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=f64)
    for name in ("upgrad", "dualproj"):
        torch.testing.assert_close(make_aggregator(name, 3).weights(gram(g), None),
                                   torch.full((3,), 1 / 3, dtype=f64))
    g = torch.tensor([[1.0, 1.0], [-1.0, 0.2], [0.3, -1.0]], dtype=f64)  # all in conflict
    w = make_aggregator("upgrad", 3).weights(gram(g), None)
    assert not torch.allclose(w, torch.full((3,), 1 / 3, dtype=f64))
    assert (g @ (w @ g) >= -1e-12).all()


def test_rlw():
    draws = [make_aggregator("rlw", 3, seed=s).weights(None, None) for s in (1, 1, 2)]
    assert all((w > 0).all() and abs(w.sum() - 1) < 1e-12 for w in draws)
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.allclose(draws[0], draws[2])
    agg = make_aggregator("rlw", 3, seed=1)
    assert not torch.allclose(agg.weights(None, None), agg.weights(None, None))


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_exactly(name):
    grams = [gram(rand_grads(3, 3, s)) for s in range(4)]
    losses = torch.ones(3, dtype=f64)
    agg = make_aggregator(name, 3, seed=7)
    for g in grams[:2]:
        agg.weights(g, losses)
    state = roundtrip(agg.state_dict())
    expected = [agg.weights(g, losses) for g in grams[2:]]
    resumed = make_aggregator(name, 3, seed=123)
    resumed.load_state_dict(state)
    for g, w in zip(grams[2:], expected):
        assert torch.equal(resumed.weights(g, losses), w)


def conflicting_grams():
    """Full-rank Grams (quadprog needs G > 0 when reg_eps = 0) with conflicts in most."""
    return [(k, gram(rand_grads(k, k + 1, seed))) for k in (2, 3, 5) for seed in range(4)]


def test_against_torchjd_weightings():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    from torchjd.linalg import QuadprogProjector
    exact = QuadprogProjector(reg_eps=0.0)
    moved = 0
    for k, g in conflicting_grams():
        ours = {n: make_aggregator(n, k).weights(g, None) for n in NAMES}
        moved += not torch.allclose(ours["upgrad"], torch.full((k,), 1 / k, dtype=f64))
        checks = [
            (ours["upgrad"], tjd.UPGradWeighting(projector=exact)(g)),
            (make_aggregator("upgrad", k, reg_eps=1e-4).weights(g, None), tjd.UPGradWeighting()(g)),
            (ours["dualproj"], tjd.DualProjWeighting(projector=exact)(g)),
            (ours["imtl_g"], tjd.IMTLGWeighting()(g)),
            (ours["aligned_mtl"] / k, tjd.AlignedMTLWeighting()(g)),  # theirs: mean, not sum
        ]
        if k == 2:  # Frank-Wolfe is exact in one step for two tasks; PCGrad's order irrelevant
            checks += [(ours["mgda"], tjd.MGDAWeighting()(g)),
                       (ours["pcgrad"], tjd.PCGradWeighting()(g))]
        for mine, theirs in checks:
            torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=1e-9)
        fw = tjd.MGDAWeighting(epsilon=1e-12, max_iters=200)(g)  # sublinear: compare norms
        assert ours["mgda"] @ g @ ours["mgda"] <= fw @ g @ fw + 1e-12
    assert moved >= 4  # the projections did something


def test_against_torchjd_cvxpy_weightings():
    tjd = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    for k, g in conflicting_grams():
        mine = make_aggregator("cagrad", k, rescale=False).weights(g, None)
        theirs = tjd.CAGradWeighting(c=0.4)(g)  # CLARABEL to its tolerance: ours is lower
        assert cagrad_objective(g, mine) <= cagrad_objective(g, theirs) + 1e-12
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
        j = torch.linalg.cholesky(g)  # any J with J J^T = G
        nash = tjd.NashMTL(n_tasks=k, max_norm=0.0, optim_niter=200)
        mine = make_aggregator("nash_mtl", k).weights(g, None)
        torch.testing.assert_close(mine, nash.weighting(j), atol=0, rtol=1e-6)


def cagrad_objective(g, weights):
    """a . w + r ||g_w|| (trace-1 units) at the w behind CAGrad weights 1/K + r w / ||g_w||."""
    k = len(weights)
    unit, mean = g / g.trace(), torch.full((k,), 1 / k, dtype=f64)
    z = weights - mean
    w = z / z.sum()
    return (unit @ mean @ w + 0.4 * (mean @ unit @ mean).sqrt() * (w @ unit @ w).sqrt()).item()
