"""FairGrad, GradVac, FAMO and CR-MOGM's smoothing (engine/aggregators_recent.py,
balancing.FAMO): weights by value on worked examples derived by hand in the comments, each
paper's update rule run on explicit gradient vectors against our Gram-space weights, state
round trips, the options' range checks, and one tiny training run each."""
import json
import math
import os
import random
import re

import pytest
import torch

import multitask_classifier as mtc
from engine.aggregators import make_aggregator
from engine.aggregators_recent import Smoothed
from engine.balancing import balanced_weights, make_balancer
from engine.configs import MultitaskConfig
from engine.errors import ConfigError
from test_aggregator_examples import PCGRAD_G, PCGRAD_SUMS, task1_orders
from test_aggregators import gram, rand_grads, roundtrip
from test_training import run_args

f64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=f64)


def close(actual, expected, rtol=1e-12):
    torch.testing.assert_close(actual, t(expected), rtol=rtol, atol=1e-14)


def weights(name, g, **options):
    return make_aggregator(name, len(g), **options).weights(g, torch.ones(len(g), dtype=f64))


# --- FairGrad: w > 0 with G w = w^(-1/alpha) -----------------------------------------------

def test_fairgrad_worked_examples():
    # Orthogonal: G_kk w_k = w_k^(-1/alpha), so w_k = G_kk^(-alpha / (1 + alpha)); exactly
    # (G_kk + ridge ||G||_F)^(...) with the default ridge 1e-10: rtol 1e-8 here.
    close(weights("fairgrad", torch.diag(t([1.0, 4.0, 16.0]))), [1.0, 1 / 2, 1 / 4], rtol=1e-8)
    close(weights("fairgrad", torch.diag(t([1.0, 8.0, 64.0])), alpha=2.0), [1.0, 1 / 4, 1 / 16],
          rtol=1e-8)  # 8^(-2/3), 64^(-2/3)
    close(weights("fairgrad", torch.diag(t([1.0, 8.0, 64.0])), alpha=0.5), [1.0, 1 / 2, 1 / 4],
          rtol=1e-8)  # 8^(-1/3), 64^(-1/3)
    # Scale: G -> 100 G multiplies w by 100^(-alpha / (1 + alpha)) = 1/10 for alpha = 1
    close(weights("fairgrad", torch.diag(t([100.0, 400.0, 1600.0]))), [0.1, 0.05, 0.025], rtol=1e-8)
    # G = [[1, 1/2], [1/2, 1]]: by symmetry w = (a, a), (3/2) a = a^(-1/alpha):
    # alpha = 1: a = sqrt(2/3); alpha = 2: a^(3/2) = 2/3, a = (2/3)^(2/3)
    g = t([[1.0, 0.5], [0.5, 1.0]])
    close(weights("fairgrad", g), [math.sqrt(2 / 3)] * 2, rtol=1e-8)
    close(weights("fairgrad", g, alpha=2.0), [(2 / 3) ** (2 / 3)] * 2, rtol=1e-8)
    # G = [[2, 1], [1, 1]], alpha = 1: w1 (2 w1 + w2) = 1, w2 (w1 + w2) = 1. The second gives
    # w1 = 1/w2 - w2; into the first with x = w2^2: (1 - x)(2 - x) = x, x^2 - 4x + 2 = 0, and
    # w1 > 0 needs x < 1: x = 2 - sqrt 2, w2 = sqrt x, w1 = (1 - x) / w2 = (sqrt 2 - 1) / w2.
    w2 = math.sqrt(2 - math.sqrt(2))
    close(weights("fairgrad", t([[2.0, 1.0], [1.0, 1.0]])), [(math.sqrt(2) - 1) / w2, w2],
          rtol=1e-8)
    # A zero gradient has no solution (0 = w^-1): w = 0 there, the others solve alone (1/2, 1)
    close(weights("fairgrad", torch.diag(t([4.0, 0.0, 1.0]))), [0.5, 0.0, 1.0], rtol=1e-8)
    close(weights("fairgrad", torch.zeros(2, 2, dtype=f64)), [0.0, 0.0])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_gains_are_the_papers_in_p_dimensions(alpha):
    """The paper's condition on the update d = sum w_k g_k: each gain g_k . d = w_k^(-1/alpha);
    and the official solver (scipy least_squares on the K residuals, from 1/K) agrees."""
    for seed in range(3):
        g = rand_grads(3, 5, seed)
        w = make_aggregator("fairgrad", 3, alpha=alpha).weights(gram(g), None)
        assert (w > 0).all()
        ridge = 1e-10 * torch.linalg.matrix_norm(gram(g)) * w  # the default ridge's share
        torch.testing.assert_close(g @ (w @ g) + ridge, w ** (-1 / alpha), rtol=1e-10, atol=0)
        optimize = pytest.importorskip("scipy.optimize")
        a = gram(g).numpy()
        official = optimize.least_squares(lambda x: a @ x - (1 / x) ** (1 / alpha),
                                          [1 / 3] * 3, bounds=(0, math.inf)).x
        torch.testing.assert_close(w, torch.from_numpy(official), rtol=1e-5, atol=0)


def test_fairgrad_alpha_one_is_nash_mtl():
    for seed in range(3):
        g = gram(rand_grads(4, 5, seed))
        torch.testing.assert_close(weights("fairgrad", g), weights("nash_mtl", g), rtol=1e-9, atol=0)


# --- GradVac --------------------------------------------------------------------------------

def test_gradvac_worked_example():
    """g1 = (1, 0), g2 = (-1, 1): cos = -1/sqrt 2, ||g1|| = 1, ||g2|| = sqrt 2; beta = 1/2."""
    g = t([[1.0, -1.0], [-1.0, 2.0]])
    agg = make_aggregator("gradvac", 2, beta=0.5)
    # Step 1, targets 0: cos < 0, so PCGrad's projection: g1 + (1/2) g2, g2 + g1 -> w = (2, 3/2).
    # Targets -> (1/2)(-1/sqrt 2) = -sqrt 2 / 4 for both pairs (with K = 2, g_i' = g_i).
    close(agg.weights(g, None), [2.0, 1.5])
    close(agg.targets, [[0.0, -math.sqrt(2) / 4], [-math.sqrt(2) / 4, 0.0]])
    # Step 2, same G: cos = -1/sqrt 2 (sin 1/sqrt 2) < phi_hat = -sqrt 2 / 4 (1 - phi_hat^2 = 7/8).
    # phi_hat sin - cos sin_hat = -1/4 + sqrt 7 / 4 for both pairs; a = ||g_i'|| (that) /
    # (||g_j|| sqrt(7/8)): task 1 a = (sqrt 7 - 1) / (2 sqrt 7), task 2 a = (sqrt 7 - 1) / sqrt 7.
    a1, a2 = (math.sqrt(7) - 1) / (2 * math.sqrt(7)), (math.sqrt(7) - 1) / math.sqrt(7)
    close(agg.weights(g, None), [1 + a2, 1 + a1])
    # check of a1 itself: g1 + a1 g2 = (1 - a1, a1) has cosine phi_hat with g2
    v = torch.tensor([1 - a1, a1], dtype=f64)
    assert abs(v @ t([-1.0, 1.0]) / (v.norm() * math.sqrt(2)) + math.sqrt(2) / 4) < 1e-15
    # targets: (1/2)(-sqrt 2 / 4) + (1/2)(-1/sqrt 2) = -3 sqrt 2 / 8
    close(agg.targets, [[0.0, -3 * math.sqrt(2) / 8], [-3 * math.sqrt(2) / 8, 0.0]])


def test_gradvac_with_beta_zero_is_pcgrad():
    # The targets stay 0: test_aggregator_examples' PCGrad sums, drawn from the same seed
    for seed in range(3):
        agg = make_aggregator("gradvac", 3, seed=seed, beta=0.0)
        for order in task1_orders(seed, 3):
            close(agg.weights(PCGRAD_G, None), PCGRAD_SUMS[order])


def gradvac_in_p_dimensions(grads, rng, targets, beta):
    """Alg. 1 of the paper on explicit vectors (K, P) -> the update (P,), in plain floats."""
    rows = [list(map(float, g)) for g in grads]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = [0.0] * len(rows[0])
    for i in range(len(rows)):
        gi = list(rows[i])
        others = [j for j in range(len(rows)) if j != i]
        rng.shuffle(others)
        for j in others:
            gj = rows[j]
            phi = dot(gi, gj) / math.sqrt(dot(gi, gi) * dot(gj, gj))
            goal = targets[i][j]
            if phi < goal:
                a = math.sqrt(dot(gi, gi)) * (goal * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - goal ** 2)) \
                    / (math.sqrt(dot(gj, gj)) * math.sqrt(1 - goal ** 2))
                gi = [x + a * y for x, y in zip(gi, gj)]
            targets[i][j] = (1 - beta) * goal + beta * phi
        total = [x + y for x, y in zip(total, gi)]
    return torch.tensor(total, dtype=f64)


def test_gradvac_matches_the_paper_in_p_dimensions():
    """Several steps of K = 3 (the second task visited sees a partly vaccinated g_i'), beta
    0.3 so that the targets move and the corrections differ from PCGrad's."""
    rng, targets = random.Random(4), [[0.0] * 3 for _ in range(3)]
    agg = make_aggregator("gradvac", 3, seed=4, beta=0.3)
    corrected = 0
    for step in range(6):
        g = rand_grads(3, 4, step)
        expected = gradvac_in_p_dimensions(g, rng, targets, 0.3)
        torch.testing.assert_close(agg.weights(gram(g), None) @ g, expected, rtol=1e-10, atol=1e-12)
        corrected += any(x > 0 for row in targets for x in row)
    torch.testing.assert_close(agg.targets, t(targets), rtol=1e-10, atol=1e-12)
    assert corrected  # some target went positive: corrections where PCGrad makes none


# --- CR-MOGM smoothing ------------------------------------------------------------------------

def test_smoothing_worked_example():
    """MGDA's two-task min-norm weights (test_aggregator_examples): diag(1, 4) -> (4/5, 1/5),
    [[1, 2], [2, 5]] -> (1, 0), I -> (1/2, 1/2); smoothed with beta = 1/4, w_1 = the first."""
    agg = make_aggregator("mgda", 2, smooth=0.25)
    assert isinstance(agg, Smoothed) and agg.name == "mgda"
    close(agg.weights(torch.diag(t([1.0, 4.0])), None), [0.8, 0.2])
    close(agg.weights(t([[1.0, 2.0], [2.0, 5.0]]), None), [0.95, 0.05])  # 0.25 w + 0.75 (1, 0)
    close(agg.weights(torch.eye(2, dtype=f64), None), [0.6125, 0.3875])  # 0.25 w + 0.75 / 2
    assert type(make_aggregator("mgda", 2, smooth=0.0)).__name__ == "MGDA"  # 0: not wrapped


def test_smoothing_matches_the_paper_in_p_dimensions():
    """lambda_t = beta lambda_{t-1} + (1 - beta) lambda_hat_t on MGDA's two-task weights,
    computed from explicit vectors: w1 = clamp((g2 - g1) . g2 / ||g1 - g2||^2, 0, 1)."""
    beta, smoothed = 0.6, None
    agg = make_aggregator("mgda", 2, smooth=beta)
    for step in range(4):
        g = rand_grads(2, 3, 10 + step)
        w1 = ((g[1] - g[0]) @ g[1] / (g[0] - g[1]).square().sum()).clamp(0, 1)
        raw = torch.stack([w1, 1 - w1])
        smoothed = raw if smoothed is None else beta * smoothed + (1 - beta) * raw
        torch.testing.assert_close(agg.weights(gram(g), None) @ g, smoothed @ g)


@pytest.mark.parametrize("name, options", [("gradvac", {"beta": 0.5}), ("rlw", {}),
                                           ("fairgrad", {"alpha": 2.0})])
def test_smoothed_state_resumes_exactly(name, options):
    grams = [gram(rand_grads(3, 3, s)) for s in range(5)]
    agg = make_aggregator(name, 3, seed=7, smooth=0.5, **options)
    for g in grams[:2]:
        agg.weights(g, None)
    resumed = make_aggregator(name, 3, seed=123, smooth=0.5, **options)
    resumed.load_state_dict(roundtrip(agg.state_dict()))
    for g in grams[2:]:
        assert torch.equal(resumed.weights(g, None), agg.weights(g, None))


def test_gradvac_state_resumes_mid_sequence():
    grams = [gram(rand_grads(3, 4, s)) for s in range(6)]
    agg = make_aggregator("gradvac", 3, seed=2, beta=0.5)
    for g in grams[:3]:
        agg.weights(g, None)
    state = roundtrip(agg.state_dict())
    assert state["targets"].abs().sum() > 0
    resumed = make_aggregator("gradvac", 3, seed=99, beta=0.5)
    resumed.load_state_dict(state)
    for g in grams[3:]:
        assert torch.equal(resumed.weights(g, None), agg.weights(g, None))


# --- FAMO ------------------------------------------------------------------------------------

def famo_by_hand(losses):
    """Expected scales of three steps of two tasks, defaults lr 0.025, gamma 1e-3, Adam betas
    (0.9, 0.999), eps 1e-8. D = L + 1e-8; scales (z / D) / sum(z / D), z = softmax(xi). From
    step 2 on, xi first takes an Adam step on grad = z * (delta - z . delta) + gamma xi,
    delta = log D_prev - log D. With two tasks grad = (u, -u) + gamma xi,
    u = z1 z2 (delta1 - delta2)."""
    lr, gamma, eps = 0.025, 1e-3, 1e-8
    d = [[x + 1e-8 for x in step] for step in losses]

    def scales(xi, dd):
        z = [math.exp(x) / sum(math.exp(y) for y in xi) for x in xi]
        r = [zk / dk for zk, dk in zip(z, dd)]
        return [x / sum(r) for x in r], z
    z = [0.5, 0.5]
    s1, _ = scales([0.0, 0.0], d[0])  # = (1/D) / sum(1/D): (4/5, 1/5) up to 1e-8
    delta = [math.log(a / b) for a, b in zip(d[0], d[1])]
    u = z[0] * z[1] * (delta[0] - delta[1])
    g1 = [u, -u]  # xi = 0: no decay; m^ = g1, v^ = g1^2 -> xi moves lr against sign(g1)
    xi2 = [-lr * g / (abs(g) + eps) for g in g1]
    s2, z2 = scales(xi2, d[1])
    delta = [math.log(a / b) for a, b in zip(d[1], d[2])]
    u = z2[0] * z2[1] * (delta[0] - delta[1])
    g2 = [u + gamma * xi2[0], -u + gamma * xi2[1]]
    xi3 = [x - lr * ((0.09 * a + 0.1 * b) / 0.19)
           / (math.sqrt((0.000999 * a * a + 0.001 * b * b) / 0.001999) + eps)
           for x, a, b in zip(xi2, g1, g2)]
    s3, _ = scales(xi3, d[2])
    return [s1, s2, s3], xi3


def test_famo_worked_example_and_resume():
    losses = [[1.0, 4.0], [0.5, 3.6], [0.45, 2.0], [0.4, 1.9]]
    expected, xi3 = famo_by_hand(losses[:3])
    close(t(expected[0]), [0.8, 0.2], rtol=1e-8)  # (1/1) : (1/4), uniform z
    bal = make_balancer("famo", 2)
    for step in range(2):
        close(bal.scales(t(losses[step]), None), expected[step])
    # task 1's log-loss fell by log 2, task 2's by log(4 / 3.6) only: u > 0, and Adam's first
    # step moves each logit by lr (to 1e-8 / u): task 2 gains weight
    close(bal.logits, [-0.025, 0.025], rtol=1e-7)
    resumed = make_balancer("famo", 2)
    resumed.load_state_dict(roundtrip(bal.state_dict()))
    for b in (bal, resumed):
        close(b.scales(t(losses[2]), None), expected[2])
        close(b.logits, xi3)
    last = t(losses[3])
    assert torch.equal(bal.scales(last, None), resumed.scales(last, None))


def test_famo_matches_the_paper_in_p_dimensions():
    """The paper's update on a tiny model, with torch's autograd and torch.optim.Adam: the
    gradient of c sum_k z_k log(L_k + eps) (c, z constants) and xi's step from the softmax's
    vector-Jacobian product with delta, here with the next step's losses (our deviation).
    Ours: the per-task gradients' Gram matrix, FAMO's scales, the plain sum."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(4, dtype=f64, generator=gen)
    xi = torch.zeros(3, dtype=f64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=0.025, weight_decay=1e-3)
    ours, agg, previous = make_balancer("famo", 3), make_aggregator("sum", 3), None
    for step in range(6):
        a, b = torch.randn(3, 5, 4, dtype=f64, generator=gen), torch.randn(3, 5, dtype=f64, generator=gen)
        theta.requires_grad_(True)
        losses = ((a @ theta - b) ** 2).mean(1) + 0.1  # (K,) a new batch each step
        if previous is not None:
            delta = (previous + 1e-8).log() - (losses.detach() + 1e-8).log()
            opt.zero_grad()
            xi.grad = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)[0]
            opt.step()
        z = torch.softmax(xi, 0).detach()
        c = 1 / (z / (losses.detach() + 1e-8)).sum()
        paper = torch.autograd.grad((c * z * (losses + 1e-8).log()).sum(), theta, retain_graph=True)[0]
        g = torch.stack([torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses])
        w = balanced_weights(gram(g), losses.detach(), agg, ours)
        torch.testing.assert_close(w @ g, paper, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.logits, xi.detach(), rtol=1e-10, atol=1e-12)
        previous = losses.detach()
        theta = (theta - 0.05 * paper).detach()
    assert (ours.logits.abs() > 0.02).all()  # xi moved: several Adam steps of ~lr


# --- options, command line ------------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    ({"fairgrad_alpha": 0.0}, "--fairgrad_alpha must be a finite number in (0, inf)"),
    ({"fairgrad_alpha": math.inf}, "--fairgrad_alpha"),
    ({"gradvac_beta": 1.0}, "--gradvac_beta must be a finite number in [0, 1)"),
    ({"gradvac_beta": -0.1}, "--gradvac_beta"),
    ({"smooth_weights": 1.0}, "--smooth_weights must be a finite number in [0, 1)"),
    ({"balance": "famo", "weight_sts": 0.0}, "--balance famo divides by each trained task"),
])
def test_option_ranges(flags, says):
    with pytest.raises(ConfigError, match="^" + re.escape(says)):
        MultitaskConfig(**flags)


def test_options_reach_the_aggregator():
    cfg = MultitaskConfig(aggregator="fairgrad", fairgrad_alpha=2.5, smooth_weights=0.3)
    spec = cfg.combination()
    agg = make_aggregator(spec.aggregator, 3, **dict(spec.options))
    assert isinstance(agg, Smoothed) and agg.beta == 0.3 and agg.inner.alpha == 2.5
    spec = MultitaskConfig(aggregator="gradvac", gradvac_beta=0.2).combination()
    assert spec.options == (("beta", 0.2),)
    assert MultitaskConfig(aggregator="upgrad").combination().options == ()  # default: no wrapper
    MultitaskConfig(balance="famo", weight_sts=0.0, tasks="sst,quora")  # sts not trained: fine


def test_smoothed_runs_are_their_own_row():
    from analysis.results import config_name, config_slug
    cfg = MultitaskConfig(aggregator="upgrad", smooth_weights=0.9)
    assert config_name(cfg) == "finetune-mix + upgrad + smoothed 0.9 (0.3)"
    assert config_slug(cfg) == "finetune-mix-upgrad-smoothed-0-9-0.3"
    assert config_name(MultitaskConfig(aggregator="upgrad")) == "finetune-mix + upgrad (0.3)"


@pytest.mark.parametrize("flags", [["--aggregator", "fairgrad", "--fairgrad_alpha", "2"],
                                   ["--aggregator", "gradvac", "--gradvac_beta", "0.5"],
                                   ["--balance", "famo"],
                                   ["--aggregator", "upgrad", "--smooth_weights", "0.5"]])
def test_a_tiny_run_finishes(tiny_checkpoint, tiny_data, tmp_path, flags):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1", *flags))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 1 and all(math.isfinite(v) for v in lines[0]["train_loss"].values())
