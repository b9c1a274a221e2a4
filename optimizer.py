"""AdamW (Loshchilov & Hutter, 2019) as the minBERT starter specifies it."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


class AdamW(Optimizer):
    """Adam with decoupled weight decay.

    Per step t, for each parameter p with gradient g:
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t)   (Kingma & Ba, section 2's
                                                        "efficient" bias correction)
        p <- p - alpha m / (sqrt(v) + eps)
        p <- p - lr wd p                                (decay after the Adam update)
    With correct_bias=False, alpha = lr.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[0]} - should be in [0.0, 1.0)")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[1]} - should be in [0.0, 1.0)")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} - should be >= 0.0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias)
        super().__init__(params, defaults)
        self._scratch: dict = {}  # (device, dtype) -> flat tensor for sqrt(v) + eps

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients; "
                                       "use torch.optim.SparseAdam instead")
                self._update(p, group, beta1, beta2)
        return loss

    def _update(self, p: torch.Tensor, group: dict, beta1: float, beta2: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        p.addcdiv_(m, self._denominator(v, group["eps"]), value=-step_size)
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])

    def _denominator(self, v: torch.Tensor, eps: float) -> torch.Tensor:
        """sqrt(v) + eps, the same numbers, in one reused scratch tensor: a fresh one for the
        word embedding (47 MB for MiniLM) is allocated and page-faulted in every step on a
        CPU, which costs twice the sqrt itself."""
        if not v.is_contiguous():
            return v.sqrt().add_(eps)
        key = (v.device, v.dtype)
        if key not in self._scratch or self._scratch[key].numel() < v.numel():
            self._scratch[key] = torch.empty(v.numel(), device=v.device, dtype=v.dtype)
        denominator = self._scratch[key][:v.numel()].view_as(v)
        return torch.sqrt(v, out=denominator).add_(eps)
