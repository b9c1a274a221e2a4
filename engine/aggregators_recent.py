"""FairGrad, GradVac and CR-MOGM's weight smoothing, in the Gram space of aggregators.py
(added to its AGGREGATORS below; `make_aggregator(..., smooth=beta)` wraps any aggregator in
`Smoothed`). Each returns weights w (K,) on the raw task gradients, update sum_k w_k g_k.
"""
from __future__ import annotations

import math
import random

import torch

from engine.aggregators import AGGREGATORS, Aggregator


class FairGrad(Aggregator):
    """FairGrad (Ban & Ji 2024, eq. 4): alpha-fair weights, w > 0 with G w = w^(-1/alpha)
    elementwise, i.e. each task's gain g_k . d = w_k^(-1/alpha) for d = sum w_k g_k. alpha = 1
    (the paper's proportional fairness) is Nash-MTL's equation w_k (G w)_k = 1; alpha -> inf
    tends to equal gains G w = 1.

    Solved as Nash-MTL's: these are the stationarity equations of the strictly convex
    F(w) = w^T G w / 2 - sum_k phi(w_k), phi' = w^(-1/alpha) (phi = log w for alpha = 1), on
    G / ||G||_F (w scales back by ||G||_F^(-alpha / (1 + alpha))): damped Newton, with a
    backtracking (Armijo) line search while the Newton decrement is >= 1/4 and full steps after,
    to a relative residual of 1e-10, halving any step that would leave w > 0 behind. The
    official code and LibMTL / TorchJD run scipy's least_squares on the K residuals from
    w = 1/K to its default tolerances: the same equations (the tests agree with it to 1e-5).

    Singular G: a task with a zero gradient has (G w)_k = 0 < w_k^(-1/alpha) for every finite
    w_k, so no solution (least_squares drives w_k up until it stops, harmlessly: w_k g_k = 0);
    we set w_k = 0 and solve for the others, whose equations do not involve it. Dependent
    gradients may have no solution either (a Pareto-stationary G leaves F without a
    minimiser): `ridge` (x I, on G / ||G||_F) keeps w finite there, as in NashMTL. Not used:
    the official trainer's clip_grad_norm_(max_norm=1)."""
    name = "fairgrad"

    def __init__(self, num_tasks: int, seed: int = 0, alpha: float = 1.0, ridge: float = 1e-10,
                 iterations: int = 100):
        super().__init__(num_tasks)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        self.alpha, self.ridge, self.iterations = alpha, ridge, iterations

    def weights(self, gram, losses):
        weights = torch.zeros(self.num_tasks, dtype=gram.dtype)
        live = gram.diagonal() > 1e-12 * gram.diagonal().max().clamp(min=0)  # (K,)
        if not live.any():
            return weights
        fro = torch.linalg.matrix_norm(gram)
        unit = gram[live][:, live] / fro  # (L, L)
        unit = unit + self.ridge * torch.eye(len(unit), dtype=gram.dtype)
        weights[live] = self._solve(unit) * fro ** (-self.alpha / (1 + self.alpha))
        return weights

    def _objective(self, unit: torch.Tensor, w: torch.Tensor) -> float:
        power = 1 - 1 / self.alpha
        barrier = w.log().sum() if power == 0 else (w ** power).sum() / power
        return float(w @ unit @ w / 2 - barrier)

    def _solve(self, unit: torch.Tensor) -> torch.Tensor:
        p = 1 / self.alpha
        w = unit.diagonal() ** (-self.alpha / (1 + self.alpha))  # the answer for a diagonal G
        for _ in range(self.iterations):
            grad = unit @ w - w ** -p  # dF
            if (grad * w ** p).abs().max() < 1e-10:
                break
            step = torch.linalg.solve(unit + torch.diag(p * w ** (-p - 1)), grad)  # H^{-1} dF
            slope = float(step @ grad)  # the Newton decrement squared
            size = 1.0
            while bool((w - size * step <= 0).any()):
                size /= 2
            if slope >= 1 / 16:  # far from the solution: backtrack until F falls enough
                start = self._objective(unit, w)
                while self._objective(unit, w - size * step) > start - size * slope / 4 \
                        and size > 1e-12:
                    size /= 2
            w = w - size * step
        return w


class GradVac(Aggregator):
    """Gradient Vaccine (Wang et al. 2021, Alg. 1, one group = the whole encoder): for each
    task i and each other task j (a random order per i from a seeded random.Random, whose
    state resumes, as PCGrad's), phi = cos(g_i', g_j) of the partly vaccinated g_i' and the
    original g_j; if phi < phi_hat[i, j], g_i' += a g_j with the paper's closed form
      a = ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)),
    which makes cos(g_i' + a g_j, g_j) = phi_hat (law of sines in the plane of g_i', g_j: a
    ||g_j|| / sin(theta - theta_hat) = ||g_i'|| / sin(theta_hat)); then the target's EMA
    phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi, from 0. The update is sum_i g_i'.
    phi_hat = 0 (beta = 0) is PCGrad exactly: a = -g_i' . g_j / ||g_j||^2 when phi < 0.

    Gram space: g_i' = sum_m C[i, m] g_m with C = I at first, so g_i' . g_j = (C[i] G)_j,
    ||g_i'||^2 = C[i] G C[i]^T, ||g_j||^2 = G_jj; adding a g_j is C[i, j] += a; w = 1^T C.

    Like LibMTL and TorchJD (both transcribe Alg. 1), the EMA takes the phi computed with the
    partly vaccinated g_i' (for K = 2 that is cos(g_i, g_j) itself). They add 1e-8 to the
    denominators; we skip a pair whose g_i' or g_j is zero (no direction: no correction, the
    target unchanged) and never correct towards phi_hat >= 1 (a would be infinite).
    beta: LibMTL and TorchJD default to 0.5; ours, 0.01, keeps a target that moves over ~100
    steps (the paper's value could not be checked from the sources at hand)."""
    name = "gradvac"

    def __init__(self, num_tasks: int, seed: int = 0, beta: float = 0.01):
        super().__init__(num_tasks)
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.rng = random.Random(seed)
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)  # phi_hat[i, j]

    def weights(self, gram, losses):
        coeffs = torch.eye(self.num_tasks, dtype=gram.dtype)  # C (K, K)
        for i in range(self.num_tasks):
            others = [j for j in range(self.num_tasks) if j != i]
            self.rng.shuffle(others)
            for j in others:
                self._vaccinate(gram, coeffs[i], i, j)
        return coeffs.sum(0)

    def _vaccinate(self, gram: torch.Tensor, row: torch.Tensor, i: int, j: int) -> None:
        """Task i's row C[i] (K,), in place, against task j."""
        norm_i = math.sqrt(max(float(row @ gram @ row), 0.0))
        norm_j = math.sqrt(max(float(gram[j, j]), 0.0))
        if norm_i == 0 or norm_j == 0:
            return
        cos = min(max(float(row @ gram[:, j]) / (norm_i * norm_j), -1.0), 1.0)
        target = float(self.targets[i, j])
        if cos < target < 1:
            sin, sin_target = math.sqrt(1 - cos ** 2), math.sqrt(1 - target ** 2)
            row[j] += norm_i * (target * sin - cos * sin_target) / (norm_j * sin_target)
        self.targets[i, j] = (1 - self.beta) * target + self.beta * cos

    def state_dict(self):
        return {"targets": self.targets.clone(), "rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.targets = state["targets"].clone()
        version, internal, gauss = state["rng"]  # a saved tuple may come back as a list
        self.rng.setstate((version, tuple(internal), gauss))


class Smoothed(Aggregator):
    """CR-MOGM (Zhou et al. 2022): any aggregator's weights averaged over the steps,
    w_t = beta w_{t-1} + (1 - beta) w_raw_t, w_1 = w_raw_1: beta weighs the past (the paper's
    alpha_t; TorchJD's CRMOGMWeighting likewise). The paper's Corollary 1 lets alpha_t rise
    from 0 towards 1 as the learning rate decays (TorchJD suggests 1 - lr_t / lr_0); we keep
    beta constant. Under a balancer the smoothed weights are the aggregator's, on the scaled
    gradients (balancing.balanced_weights)."""

    def __init__(self, inner: Aggregator, beta: float):
        super().__init__(inner.num_tasks)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.inner, self.beta, self.name = inner, beta, inner.name
        self.reads_gram = inner.reads_gram
        self.last: torch.Tensor | None = None  # w_{t-1}

    def weights(self, gram, losses):
        raw = self.inner.weights(gram, losses)
        self.last = raw if self.last is None else self.beta * self.last + (1 - self.beta) * raw
        return self.last.clone()

    def state_dict(self):
        return {"inner": self.inner.state_dict(),
                "last": None if self.last is None else self.last.clone()}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.last = None if state["last"] is None else state["last"].clone()


AGGREGATORS.update({cls.name: cls for cls in (FairGrad, GradVac)})
