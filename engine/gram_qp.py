"""Exact solvers for the small problems of aggregators.py, by active-set enumeration.

K (tasks) is small, so all 2^K candidate supports can be tried at once: for each, the KKT
conditions are a linear system; one batched solve, then keep the KKT points. Convexity makes
any KKT point optimal, so the result is exact (to rounding), with no iteration tolerance and
no regulariser for rank-deficient Gram matrices.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _free_sets(num_tasks: int) -> torch.Tensor:
    """Every subset of the K coordinates as a (2^K, K) bool mask."""
    codes = torch.arange(2 ** num_tasks)[:, None]
    return (codes >> torch.arange(num_tasks)) & 1 == 1


def solve_qp(quad: torch.Tensor, linear: torch.Tensor, lower: torch.Tensor, simplex: bool,
             tol: float = 1e-9) -> torch.Tensor:
    """min_x 1/2 x^T Q x + q^T x  s.t.  x >= lower (and sum(x) = 1 if `simplex`), for a batch
    of problems sharing Q: quad (K, K) PSD, linear and lower (B, K) -> x (B, K).

    Exact active-set enumeration. For each candidate free set F (x_i > lower_i) the KKT
    conditions are linear: (Q x + q)_i = lam on F (lam = 0 without the simplex) and
    x_i = lower_i off F. All 2^K systems are solved in one batch; the answer is the lowest
    objective among the KKT points (x >= lower, multiplier (Q x + q)_i - lam >= 0 off F).
    The problem is convex, so a KKT point is optimal; and one optimum has (affinely)
    independent free rows, so a nonsingular system: rank-deficient Q needs no regulariser.
    Inputs should be O(1) (callers divide G by its trace): `tol` is absolute."""
    batch, k = lower.shape
    if k > 12:
        raise ValueError(f"solve_qp enumerates 2^K active sets; K = {k} is too many")
    free = _free_sets(k)  # (S, K)
    eye = torch.eye(k + 1, dtype=quad.dtype)
    # Rows of the KKT matrix in x and lam: free i -> [Q_i, -1], fixed i -> [e_i, 0].
    kkt_rows = torch.cat([quad, -torch.ones(k, 1, dtype=quad.dtype)], 1)  # (K, K+1)
    rows = torch.where(free[:, :, None], kkt_rows, eye[:k])  # (S, K, K+1)
    last = torch.cat([torch.ones(k, dtype=quad.dtype), torch.zeros(1, dtype=quad.dtype)]) \
        if simplex else eye[k]  # sum(x) = 1, or lam = 0
    mat = torch.cat([rows, last.expand(len(free), 1, k + 1)], 1)  # (S, K+1, K+1)
    rhs = torch.where(free, -linear[:, None, :], lower[:, None, :])  # (B, S, K)
    rhs = torch.cat([rhs, torch.full((batch, len(free), 1), float(simplex), dtype=quad.dtype)], 2)
    sol, info = torch.linalg.solve_ex(mat.expand(batch, -1, -1, -1), rhs)  # (B, S, K+1)
    sol = torch.where((info == 0)[..., None] & sol.isfinite(), sol, torch.zeros_like(sol))
    x, lam = sol[..., :k], sol[..., k:]  # (B, S, K), (B, S, 1)
    mult = x @ quad + linear[:, None, :] - lam  # (B, S, K): 0 on F, must be >= 0 off F
    violation = torch.stack([
        (mat @ sol[..., None]).squeeze(-1).sub(rhs).abs().amax(-1),  # the system itself
        (lower[:, None, :] - x).amax(-1),  # x >= lower
        torch.where(free, 0.0, -mult).amax(-1),  # multipliers >= 0
    ]).amax(0) + (info != 0) * 1e30  # (B, S)
    objective = 0.5 * ((x @ quad) * x).sum(-1) + (linear[:, None, :] * x).sum(-1)  # (B, S)
    scale = 1.0 + x.abs().amax(-1)
    score = torch.where(violation <= tol * scale, objective, torch.inf)
    # Never empty in exact arithmetic; if rounding empties it, take the least violating.
    best = torch.where(score.isfinite().any(-1), score.argmin(-1), violation.argmin(-1))  # (B,)
    return x[torch.arange(batch), best]


def cagrad_inner(unit: torch.Tensor, along: torch.Tensor, radius: float,
                  tol: float = 1e-9) -> torch.Tensor | None:
    """z = r w* / ||g_w*|| (K,) for w* = argmin_{w in simplex} a.w + r ||g_w||, with
    a = along = G 1/K and unit = G (trace 1); None if no minimiser has g_w != 0.

    Exact enumeration like solve_qp. With z = r w / ||g_w||, stationarity on the support F
    is a_F + G_FF z_F = lam 1, so z_F = lam p - q (G_FF p = 1, G_FF q = a_F), and
    ||g_w|| = r / sum(z) turns into z^T G z = r^2: a quadratic in lam whose larger root
    gives sum(z) > 0. Keep the KKT points (z >= 0; a + G z >= lam off F), lowest objective.
    A minimiser with g_w != 0 has independent free gradients (else scaling along the
    dependence lowers the 1-homogeneous objective), so G_FF is invertible."""
    k = len(along)
    free = _free_sets(k)[1:]  # (S, K), non-empty supports
    mat = torch.where(free[:, :, None] & free[:, None, :], unit, torch.eye(k, dtype=unit.dtype))
    rhs = torch.stack([torch.ones_like(along).expand(len(free), k), along.expand(len(free), k)],
                      -1) * free[..., None]  # (S, K, 2): [1, a] on F, 0 off F
    sol, info = torch.linalg.solve_ex(mat, rhs)  # (S, K, 2)
    sol = torch.where((info == 0)[:, None, None] & sol.isfinite(), sol, torch.zeros_like(sol))
    p, q = sol[..., 0], sol[..., 1]  # (S, K), zero off F
    pp, pq, qq = p.sum(-1), q.sum(-1), (q * along).sum(-1)  # 1.p = p^T G p, 1.q, a.q = q^T G q
    disc = pq ** 2 - pp * (qq - radius ** 2)
    lam = (pq + disc.clamp(min=0).sqrt()) / pp.clamp(min=1e-300)  # (S,)
    z = lam[:, None] * p - q  # (S, K)
    total = lam * pp - pq  # sum(z) = r / ||g_w||
    slack = along + z @ unit - lam[:, None]  # (S, K): 0 on F, >= 0 off F
    violation = torch.stack([-z.amin(-1), -disc, -total, torch.where(free, slack.abs(), -slack)
                             .amax(-1)]).amax(0) + (info != 0) * 1e30
    objective = (along @ z.T + radius ** 2) / total.clamp(min=1e-300)  # a.w + r ||g_w||
    ok = violation <= tol * (1 + z.abs().amax(-1))
    if not ok.any():
        return None
    return z[torch.where(ok, objective, torch.inf).argmin()]
