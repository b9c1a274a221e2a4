"""Loss balancing, composable with any aggregator in aggregators.py, in Gram space.

A balancer gives per-task scales s (K,): task k's loss becomes s_k L_k, so its gradient
s_k g_k. The aggregator then sees G' = diag(s) G diag(s) and returns w' for the scaled
gradients; the weights on the raw gradients are w' * s (`balanced_weights`).

Interface: `scales(losses, gram) -> s` once per step, `end_epoch(mean_losses)` once per
epoch, `state_dict()` / `load_state_dict(d)` for resume; `make_balancer(name, num_tasks,
**options)` builds one from the `BALANCERS` registry.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from engine.aggregators import Aggregator


def _as_vector(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()


class Balancer:
    """Base: scales 1 (no balancing). `reads_gram` as aggregators.Aggregator's."""
    name = "none"
    reads_gram = False

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    def scales(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        return torch.ones(self.num_tasks, dtype=torch.float64)

    def end_epoch(self, mean_losses: Sequence[float]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Uncertainty(Balancer):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018) in one uniform form,
    sum_k exp(-s_k) L_k + s_k with log-variances s_k = log sigma_k^2 (the paper's 1/2 of a
    regression task, 1/(2 sigma^2), is left out: the same minimiser, a scale half as big).
    Scales are exp(-s_k); after each step s_k takes its own gradient 1 - exp(-s_k) L_k,
    zero at s_k = log L_k, through a hand-written Adam.

    lr 1e-2: s is a handful of numbers of order 1 (log of losses 0.1-2), not a BERT weight,
    so the fine-tuning lr (~1e-5) would leave it at 0 for a whole run; Adam moves each s_k
    by about lr per step, so it reaches log L within a few hundred steps of thousands and
    then jitters by about lr around it."""
    name = "uncertainty"

    def __init__(self, num_tasks: int, lr: float = 1e-2, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(num_tasks)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.log_vars = torch.zeros(num_tasks, dtype=torch.float64)  # s (K,)
        self.moments = torch.zeros(2, num_tasks, dtype=torch.float64)  # Adam m, v
        self.steps = 0

    def scales(self, losses, gram):
        scale = torch.exp(-self.log_vars)  # this step's weights, at the current s
        grad = 1 - scale * _as_vector(losses)  # d/ds_k [exp(-s_k) L_k + s_k]
        self.steps += 1
        (b1, b2), (m, v) = self.betas, self.moments
        m.mul_(b1).add_((1 - b1) * grad)
        v.mul_(b2).add_((1 - b2) * grad ** 2)
        m_hat, v_hat = m / (1 - b1 ** self.steps), v / (1 - b2 ** self.steps)
        self.log_vars -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return scale

    def state_dict(self):
        return {"log_vars": self.log_vars.clone(), "moments": self.moments.clone(),
                "steps": self.steps}

    def load_state_dict(self, state):
        self.log_vars = state["log_vars"].clone()
        self.moments = state["moments"].clone()
        self.steps = state["steps"]


class DynamicWeightAverage(Balancer):
    """DWA (Liu et al. 2019, MTAN): w_k = K softmax_k(r_k / T), r_k = L_k(t-1) / L_k(t-2)
    from the epoch mean losses; 1 for the first two epochs. A task whose loss falls slowly
    gets more weight. A non-positive L_k(t-2) counts as r_k = 1."""
    name = "dwa"

    def __init__(self, num_tasks: int, temperature: float = 2.0):
        super().__init__(num_tasks)
        self.temperature = temperature
        self.history: list[list[float]] = []  # the last two epochs' mean losses

    def scales(self, losses, gram):
        if len(self.history) < 2:
            return torch.ones(self.num_tasks, dtype=torch.float64)
        before, last = _as_vector(self.history[0]), _as_vector(self.history[1])
        ratio = torch.where(before > 0, last / before.clamp(min=1e-300), torch.ones_like(last))
        return self.num_tasks * torch.softmax(ratio / self.temperature, 0)

    def end_epoch(self, mean_losses):
        self.history = (self.history + [[float(x) for x in mean_losses]])[-2:]

    def state_dict(self):
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state):
        self.history = [list(h) for h in state["history"]]


class GradNormEqualiser(Balancer):
    """Equal gradient norms: s_k = mean_norm / norm_k, norms an exponential moving average
    (beta, bias-corrected as Adam) of ||g_k|| = sqrt(G_kk), mean over tasks with a nonzero
    norm; a zero norm gets scale 1. The automatic version of hand-set loss weights (here
    SST / Quora / STS norms 7.4 / 4.0 / 15.3 were evened out by weights 1 / 2 / 0.5). Not
    GradNorm (Chen et al. 2018), which learns the weights with its own loss and optimizer."""
    name = "grad_norm"
    reads_gram = True

    def __init__(self, num_tasks: int, beta: float = 0.9):
        super().__init__(num_tasks)
        self.beta = beta
        self.average = torch.zeros(num_tasks, dtype=torch.float64)  # biased EMA of norms
        self.steps = 0

    def scales(self, losses, gram):
        norms = gram.diagonal().to(torch.float64).clamp(min=0).sqrt()  # (K,)
        self.steps += 1
        self.average = self.beta * self.average + (1 - self.beta) * norms
        smooth = self.average / (1 - self.beta ** self.steps)  # bias-corrected
        live = smooth > 0
        if not live.any():
            return torch.ones(self.num_tasks, dtype=torch.float64)
        target = smooth[live].mean()
        return torch.where(live, target / smooth.clamp(min=1e-300), torch.ones_like(smooth))

    def state_dict(self):
        return {"average": self.average.clone(), "steps": self.steps}

    def load_state_dict(self, state):
        self.average = state["average"].clone()
        self.steps = state["steps"]


class FAMO(Balancer):
    """FAMO (Liu et al. 2023): task logits xi (K,), z = softmax(xi); the update is the
    gradient of c sum_k z_k log(L_k + eps) (c a constant), so the scales are
    s_k = c z_k / (L_k + eps), c = 1 / sum_k z_k / (L_k + eps) (sum s = 1), eps = 1e-8 as
    officially. Then xi learns from each task's log-loss decrease
    delta_k = log(L_k before + eps) - log(L_k after + eps): its gradient is the softmax's
    Jacobian times delta, z * (delta - z . delta), stepped by Adam with L2 weight decay
    gamma (torch.optim.Adam's weight_decay) as the official code: a task whose loss falls
    slowly gains weight. lr 0.025 and gamma 1e-3 are the paper's (Alg. 2) and LibMTL's; the
    official code defaults gamma to 1e-5 (1e-3 or 1e-2 in its run scripts).

    Deviation: the official code measures "after" on the same batch with an extra forward
    pass after the step; that costs a forward per step, so "after" is the next step's losses
    (another batch): at step t, xi first learns from L_{t-1} -> L_t, then weights step t.
    The first step has no previous losses (xi = 0, z uniform). Not used: the official
    trainer's clip_grad_norm_(max_norm=1)."""
    name = "famo"

    def __init__(self, num_tasks: int, lr: float = 0.025, gamma: float = 1e-3,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(num_tasks)
        self.lr, self.gamma, self.betas, self.eps = lr, gamma, betas, eps
        self.logits = torch.zeros(num_tasks, dtype=torch.float64)  # xi (K,)
        self.moments = torch.zeros(2, num_tasks, dtype=torch.float64)  # Adam m, v
        self.steps = 0
        self.previous: torch.Tensor | None = None  # last step's L + 1e-8 (K,)

    def scales(self, losses, gram):
        shifted = _as_vector(losses) + 1e-8
        if self.previous is not None:
            self._learn(self.previous.log() - shifted.log())
        self.previous = shifted
        weights = torch.softmax(self.logits, 0) / shifted
        return weights / weights.sum()

    def _learn(self, decrease: torch.Tensor) -> None:
        """One Adam step on xi, gradient d(z . delta)/d xi + gamma xi."""
        z = torch.softmax(self.logits, 0)
        grad = z * (decrease - z @ decrease) + self.gamma * self.logits
        self.steps += 1
        (b1, b2), (m, v) = self.betas, self.moments
        m.mul_(b1).add_((1 - b1) * grad)
        v.mul_(b2).add_((1 - b2) * grad ** 2)
        m_hat, v_hat = m / (1 - b1 ** self.steps), v / (1 - b2 ** self.steps)
        self.logits = self.logits - self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self):
        return {"logits": self.logits.clone(), "moments": self.moments.clone(),
                "steps": self.steps,
                "previous": None if self.previous is None else self.previous.clone()}

    def load_state_dict(self, state):
        self.logits = state["logits"].clone()
        self.moments = state["moments"].clone()
        self.steps = state["steps"]
        self.previous = None if state["previous"] is None else state["previous"].clone()


BALANCERS: dict[str, Callable[..., Balancer]] = {
    cls.name: cls for cls in (Balancer, Uncertainty, DynamicWeightAverage, GradNormEqualiser,
                              FAMO)}


def make_balancer(name: str, num_tasks: int, **options) -> Balancer:
    """BALANCERS[name](num_tasks, **options); unknown options raise TypeError."""
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; choose from {', '.join(BALANCERS)}")
    return BALANCERS[name](num_tasks, **options)


def balanced_weights(gram: torch.Tensor, losses, aggregator: Aggregator,
                     balancer: Balancer) -> torch.Tensor:
    """Weights (K,) on the raw gradients: the aggregator runs on the scaled tasks s_k g_k,
    s_k L_k (Gram diag(s) G diag(s)), and its w' on s_k g_k is w' * s on g_k. `gram` None
    where neither reads it (their `reads_gram`)."""
    scale = balancer.scales(losses, gram)  # (K,)
    scaled_gram = None if gram is None else scale[:, None] * gram * scale[None, :]  # (K, K)
    return aggregator.weights(scaled_gram, _as_vector(losses) * scale) * scale
