"""Gradient aggregators for multi-task learning, in Gram space.

Each method turns the (K, K) Gram matrix G[i, j] = g_i . g_j of the task gradients (float64,
CPU) into weights w (K,), update = sum_k w[k] g_k: only inner products of the gradients are
needed, so the P-dimensional vectors are touched once for G and once for the sum (see
pcgrad.py). The task losses (K,) are passed for a uniform interface; no method uses them.
`state_dict()` / `load_state_dict()` carry what a resumed run needs (RNG states, Nash-MTL's
warm start). The small constrained problems (MGDA, UPGrad, DualProj, CAGrad's inner problem)
are solved exactly by enumerating active sets, cheap for the K <= 12 tasks allowed.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from engine.gram_qp import cagrad_inner, solve_qp
from pcgrad import combine_weights

# Aligned-MTL's official code drops eigenvalues below max * K * eps with torch's *default*
# dtype eps (float32), whatever the Gram's dtype; torchjd copies it, and so do we.
ALIGNED_EPS = torch.finfo(torch.float32).eps


def _unit_trace(gram: torch.Tensor) -> torch.Tensor | None:
    """G / trace(G): the same problem for scale-free methods, in O(1) numbers; None if G = 0."""
    trace = gram.diagonal().sum()
    return gram / trace if trace > 0 else None


class Aggregator:
    """Base: update = sum_k w[k] g_k with w = weights(gram (K, K), losses (K,)) -> (K,).
    `reads_gram` False: the weights never look at the Gram matrix (it may be None), so a
    step can take them before its backward (combiner.LossWeights)."""
    name = ""
    reads_gram = True

    def __init__(self, num_tasks: int, seed: int = 0):
        self.num_tasks = num_tasks

    def weights(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _ones(self) -> torch.Tensor:
        return torch.ones(self.num_tasks, dtype=torch.float64)


class Sum(Aggregator):
    """Plain summed losses: w = 1."""
    name = "sum"
    reads_gram = False

    def weights(self, gram, losses):
        return self._ones()


class PCGradAggregator(Aggregator):
    """PCGrad (Yu et al. 2020) through pcgrad.py: each g_i projected off the g_j it conflicts
    with, in a random order per task from a seeded random.Random (its state resumes)."""
    name = "pcgrad"

    def __init__(self, num_tasks: int, seed: int = 0, reduction: str = "sum"):
        super().__init__(num_tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.rng = random.Random(seed)

    def weights(self, gram, losses):
        return combine_weights(gram, self.rng, True, self.reduction)

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        version, internal, gauss = state["rng"]  # a saved tuple may come back as a list
        self.rng.setstate((version, tuple(internal), gauss))


class MGDA(Aggregator):
    """MGDA's min-norm point (Sener & Koltun 2018): min_{w in simplex} w^T G w,
    solved exactly (torchjd/the paper run Frank-Wolfe to a tolerance). All-zero G: 1/K."""
    name = "mgda"

    def weights(self, gram, losses):
        unit = _unit_trace(gram)
        if unit is None:
            return self._ones() / self.num_tasks
        zeros = torch.zeros(1, self.num_tasks, dtype=gram.dtype)
        return solve_qp(unit, zeros, zeros, simplex=True)[0]


class IMTLG(Aggregator):
    """IMTL-G (Liu et al. 2021): the update d = sum alpha_k g_k, sum alpha = 1, with
    equal projections on every unit gradient u_k = g_k / ||g_k||. Closed form
    alpha_{2:K} = g_1 U^T (D U^T)^{-1}, D = [g_1 - g_k]_k, U = [u_1 - u_k]_k, alpha_1 = 1 -
    sum, where g_i . u_j = G[i, j] / ||g_j||. Zero or dependent gradients make D U^T singular:
    then torchjd's generalisation alpha ∝ pinv(G) ||g|| (the same d when G is invertible)."""
    name = "imtl_g"

    def weights(self, gram, losses):
        norms = gram.diagonal().clamp(min=0).sqrt()  # (K,)
        if self.num_tasks == 1:
            return self._ones()
        if (norms > 0).all():
            on_units = gram / norms[None, :]  # (K, K): g_i . u_j
            diff = on_units[0] - on_units  # (K, K): (g_1 - g_i) . u_j
            du = diff[1:, :1] - diff[1:, 1:]  # (K-1, K-1): (g_1 - g_a) . (u_1 - u_b)
            gu = on_units[0, :1] - on_units[0, 1:]  # (K-1,): g_1 . (u_1 - u_b)
            rest, info = torch.linalg.solve_ex(du.T, gu)  # alpha_{2:K} du = gu
            if info == 0 and rest.isfinite().all():
                return torch.cat([1 - rest.sum(0, keepdim=True), rest])
        alpha = torch.linalg.pinv(gram) @ norms  # G alpha ∝ ||g||: equal projections
        total = alpha.sum()
        return alpha / total if total.abs() > 1e-12 else torch.zeros_like(alpha)


class CAGrad(Aggregator):
    """CAGrad (Liu et al. 2021, Alg. 1): w* = argmin_{w in simplex} g_w . g_0 + sqrt(phi)
    ||g_w||, phi = c^2 ||g_0||^2, g_0 the mean gradient; update d = g_0 + sqrt(phi) / ||g_w*||
    g_w*, i.e. weights 1/K + z with z from cagrad_inner (solved exactly; the official code
    uses scipy SLSQP, torchjd cvxpy). Like the official code (rescale=1) d is then divided by
    1 + c^2; rescale=False gives torchjd's d. If ||g_w*|| < norm_eps ||J||_F (a Pareto-
    stationary point) d has no direction: we return d = g_0 (torchjd returns 0; the official
    code divides by ||g_w*|| + 1e-8)."""
    name = "cagrad"

    def __init__(self, num_tasks: int, seed: int = 0, c: float = 0.4, rescale: bool = True,
                 norm_eps: float = 1e-4):
        super().__init__(num_tasks)
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}")
        self.c, self.rescale, self.norm_eps = c, rescale, norm_eps

    def weights(self, gram, losses):
        mean = self._ones() / self.num_tasks
        unit = _unit_trace(gram)
        scale = 1 / (1 + self.c ** 2) if self.rescale else 1.0
        radius = self.c * (mean @ unit @ mean).clamp(min=0).sqrt().item() if unit is not None else 0
        if radius <= 0:  # c = 0 or g_0 = 0: the ball is the point g_0
            return mean * scale
        z = cagrad_inner(unit, unit @ mean, radius)
        if z is None or radius / z.sum() < self.norm_eps:
            return mean * scale
        return (mean + z) * scale


class NashMTL(Aggregator):
    """Nash-MTL (Navon et al. 2022): the bargaining solution alpha > 0 with
    alpha_i (G alpha)_i = 1 (so ||d||^2 = alpha^T G alpha = K). The official code runs up to
    20 convex-concave cvxpy/ECOS iterations with loose stopping rules; we solve the same
    equations to 1e-10 by damped Newton on the strictly convex, self-concordant
    F(a) = a^T G a / 2 - sum log a (gradient G a - 1/a): the step H^{-1} dF / (1 + lambda),
    lambda the Newton decrement, keeps a > 0 and converges from any start. Warm start: the
    last alpha (state), in G / ||G||_F units as the official code. `ridge` (x ||G||_F) keeps
    a Pareto-stationary G (no solution) finite; zero gradients get alpha = 0. As officially,
    alpha is re-solved every `update_every` steps; `max_norm` > 0 caps ||d|| like its
    clip_grad_norm_(max_norm=1.0) (off by default: ||d|| = sqrt(K) is bounded anyway)."""
    name = "nash_mtl"

    def __init__(self, num_tasks: int, seed: int = 0, max_norm: float = 0.0,
                 update_every: int = 1, ridge: float = 1e-10, iterations: int = 100):
        super().__init__(num_tasks)
        self.max_norm, self.update_every, self.ridge = max_norm, update_every, ridge
        self.iterations = iterations
        self.alpha: torch.Tensor | None = None  # (K,) last solution, original scale
        self.step = 0

    def weights(self, gram, losses):
        if self.alpha is None or self.step % self.update_every == 0:
            self.alpha = self._solve(gram)
        self.step += 1
        alpha = self.alpha.clone()
        norm = (alpha @ gram @ alpha).clamp(min=0).sqrt()
        if self.max_norm > 0 and norm > self.max_norm:
            alpha = alpha * (self.max_norm / norm)
        return alpha

    def _solve(self, gram: torch.Tensor) -> torch.Tensor:
        fro = torch.linalg.matrix_norm(gram)
        live = gram.diagonal() > 1e-12 * gram.diagonal().max().clamp(min=0)  # (K,)
        alpha = torch.zeros(self.num_tasks, dtype=gram.dtype)
        if not live.any():
            return alpha
        unit = gram[live][:, live] / fro  # (L, L)
        unit = unit + self.ridge * torch.eye(len(unit), dtype=gram.dtype)
        # Warm start: the last alpha in these units; fresh: the solution for a diagonal G.
        start = self.alpha[live] * fro.sqrt() if self.alpha is not None else unit.diagonal() ** -0.5
        a = torch.where(start > 0, start, unit.diagonal() ** -0.5)
        for _ in range(self.iterations):
            if (a * (unit @ a) - 1).abs().max() < 1e-10:
                break
            grad = unit @ a - 1 / a  # dF
            step = torch.linalg.solve(unit + torch.diag(a ** -2), grad)  # H^{-1} dF
            decrement = (step @ grad).clamp(min=0).sqrt()
            a = a - (step if decrement < 0.25 else step / (1 + decrement))
        alpha[live] = a / fro.sqrt()  # G alpha = 1/alpha for G = fro * unit
        return alpha

    def state_dict(self):
        return {"alpha": None if self.alpha is None else self.alpha.clone(), "step": self.step}

    def load_state_dict(self, state):
        self.alpha = None if state["alpha"] is None else state["alpha"].clone()
        self.step = state["step"]


class AlignedMTL(Aggregator):
    """Aligned-MTL (Senushkin et al. 2023, Alg. 1): G = V L V^T, B = sqrt(l_min) V L^{-1/2} V^T
    makes the aligned gradients g_j' = sum_k B[k, j] g_k orthogonal with equal norms
    sqrt(l_min) (their Gram is B G B = l_min I); the update is their plain sum, w = B 1, as
    the official code (torchjd averages: w = B 1 / K). Eigenvalues below l_max K eps32 are
    dropped (rank deficiency, official tolerance); scale_mode min/median/rmse picks l_min,
    the median, or the mean eigenvalue."""
    name = "aligned_mtl"

    def __init__(self, num_tasks: int, seed: int = 0, scale_mode: str = "min"):
        super().__init__(num_tasks)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be min, median or rmse, got {scale_mode!r}")
        self.scale_mode = scale_mode

    def weights(self, gram, losses):
        values, vectors = torch.linalg.eigh(gram)  # ascending
        keep = values > values.max() * self.num_tasks * ALIGNED_EPS
        if not keep.any():  # G = 0: nothing to align
            return self._ones()
        values, vectors = values[keep], vectors[:, keep]  # (R,), (K, R)
        scale = {"min": values.min(), "median": values.median(), "rmse": values.mean()}
        balance = scale[self.scale_mode].sqrt() * (vectors / values.sqrt()) @ vectors.T  # (K, K)
        return balance @ self._ones()


class UPGrad(Aggregator):
    """UPGrad (Quinton & Rey 2024) as torchjd's UPGradWeighting: each g_i / K is
    projected onto the dual cone {x : g_k . x >= 0 for all k}; the update is the sum of the
    projections. In weights (their Prop. 1) projecting sum_k u_k g_k is min_v v^T G v s.t.
    v >= u; here u = e_i / K, solved exactly. torchjd adds reg_eps (1e-4) to G / trace(G) for
    its QP solver; ours needs none (reg_eps=1e-4 reproduces torchjd's numbers)."""
    name = "upgrad"

    def __init__(self, num_tasks: int, seed: int = 0, reg_eps: float = 0.0):
        super().__init__(num_tasks)
        self.reg_eps = reg_eps

    def _project(self, gram: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """Weights (B, K) of the projections of the rows `lower` (B, K) onto the dual cone."""
        unit = _unit_trace(gram)
        if unit is None:  # every gradient zero: the cone is everything
            return lower
        unit = unit + self.reg_eps * torch.eye(self.num_tasks, dtype=gram.dtype)
        return solve_qp(unit, torch.zeros_like(lower), lower, simplex=False)

    def weights(self, gram, losses):
        rows = torch.eye(self.num_tasks, dtype=gram.dtype) / self.num_tasks  # (K, K)
        return self._project(gram, rows).sum(0)


class DualProj(UPGrad):
    """DualProj (torchjd; GEM, Lopez-Paz & Ranzato 2017, eq. 11): the mean gradient projected
    onto the dual cone, min_v v^T G v s.t. v >= 1/K."""
    name = "dualproj"

    def weights(self, gram, losses):
        mean = torch.full((1, self.num_tasks), 1 / self.num_tasks, dtype=gram.dtype)
        return self._project(gram, mean)[0]


class RLW(Aggregator):
    """Random loss weighting (Lin et al. 2022): w = softmax(z), z ~ N(0, I) drawn each step
    from a seeded generator (its state resumes); no use of G."""
    name = "rlw"
    reads_gram = False

    def __init__(self, num_tasks: int, seed: int = 0):
        super().__init__(num_tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def weights(self, gram, losses):
        draw = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
        return torch.softmax(draw, 0)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    cls.name: cls for cls in (Sum, PCGradAggregator, MGDA, IMTLG, CAGrad, NashMTL,
                              AlignedMTL, UPGrad, DualProj, RLW)}


def make_aggregator(name: str, num_tasks: int, seed: int = 0, smooth: float = 0.0,
                    **options) -> Aggregator:
    """AGGREGATORS[name](num_tasks, seed, **options), its weights averaged over the steps
    (CR-MOGM, Smoothed) if `smooth` > 0; unknown options raise TypeError."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
    aggregator = AGGREGATORS[name](num_tasks, seed=seed, **options)
    return recent.Smoothed(aggregator, smooth) if smooth else aggregator


# FairGrad, GradVac and Smoothed live in their own module, which subclasses Aggregator and
# adds its methods to AGGREGATORS: imported last, so that either module may be imported first.
from engine import aggregators_recent as recent  # noqa: E402
