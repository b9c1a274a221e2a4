"""AdamW (Loshchilov & Hutter, 2019) as the minBERT starter specifies it."""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


# _step_each updates a parameter larger than this in chunks of this many elements (a few MB
# for p, g, m and v together: they stay in cache; smaller chunks cost more in calls)
CHUNK = 1 << 18


class AdamW(Optimizer):
    """Adam with decoupled weight decay.

    Per step t, for each parameter p with gradient g:
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t)   (Kingma & Ba, section 2's
                                                        "efficient" bias correction)
        p <- p - alpha m / (sqrt(v) + eps)
        p <- p - lr wd p                                (decay after the Adam update)
    With correct_bias=False, alpha = lr.

    `foreach` chooses how a step walks the parameters; both ways run the same tensor
    operations in the same order, so on a CPU they give the same bits. None (the default)
    takes multi-tensor `torch._foreach_*` operations on CUDA and one parameter at a time
    elsewhere, as torch.optim does: see _step_foreach and _step_each for why.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True,
                 foreach: bool | None = None):
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
        # how to run a step, not a hyperparameter: kept out of param_groups and so out of
        # the state_dict (a checkpoint resumes the same on a CPU or a GPU)
        self.foreach = foreach
        self._scratch: dict[tuple, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles (and copy.deepcopy copies) defaults, state and
        # param_groups only; the foreach choice goes along, the scratch is made anew
        return {**super().__getstate__(), "foreach": self.foreach}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("foreach", None)
        self.__dict__.setdefault("_scratch", {})

    # torch wraps these four in torch._disable_dynamo, whose first call imports
    # torch._dynamo: ~1.5 s of every run's start, for an optimizer that is never traced
    add_param_group = inspect.unwrap(Optimizer.add_param_group)
    zero_grad = inspect.unwrap(Optimizer.zero_grad)
    state_dict = inspect.unwrap(Optimizer.state_dict)
    load_state_dict = inspect.unwrap(Optimizer.load_state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AdamW does not support sparse gradients; "
                                   "use torch.optim.SparseAdam instead")
            for same in by_device_and_dtype(params):
                foreach = self.foreach
                if foreach is None:
                    foreach = same[0].device.type == "cuda"
                (self._step_foreach if foreach else self._step_each)(group, same)
        return loss

    def _advance(self, group: dict, params: list[torch.Tensor]) -> tuple[list[dict], list[float]]:
        """Each parameter's state (made on its first step) with its step count t advanced,
        and each one's step size alpha. t is per parameter: one that had no gradient on
        some steps has taken fewer steps than the rest of its group."""
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            states.append(state)
        return states, [step_size(group, state["step"]) for state in states]

    def _step_each(self, group: dict, params: list[torch.Tensor]) -> None:
        """One parameter at a time. On a CPU the step is bound by memory traffic: running
        all the operations on one parameter before the next finds it still in cache,
        whereas a foreach operation (on a CPU, a C++ loop over the tensors) streams every
        parameter through memory once per operation, measured slower for BERT-base.
        sqrt(v) + eps goes into one reused buffer, not a fresh temporary per parameter."""
        states, sizes = self._advance(group, params)
        scratch = self._scratch_for(params)
        floor = sqrt_floor(group["eps"], params[0].dtype)
        for p, state, alpha in zip(params, states, sizes):
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            if p.numel() <= CHUNK or not all(t.is_contiguous() for t in tensors):
                self._update(group, alpha, floor, *tensors, scratch[:p.numel()].view_as(p))
                continue
            # Every operation is elementwise, so chunks give the same bits; a chunk's
            # operations find its p, g, m and v still in cache, where the whole (30522, 384)
            # word embedding would stream through memory once per operation (27 -> 16 ms
            # a step for MiniLM's on a 2-core EPYC).
            flat = [t.view(-1) for t in tensors]
            for first in range(0, p.numel(), CHUNK):
                end = min(first + CHUNK, p.numel())
                self._update(group, alpha, floor, *(t[first:end] for t in flat),
                             scratch[:end - first])

    @staticmethod
    def _update(group: dict, alpha: float, floor: float, p: torch.Tensor, grad: torch.Tensor,
                m: torch.Tensor, v: torch.Tensor, scratch: torch.Tensor) -> None:
        """The step's formula on one parameter (or one chunk of it), in place. `floor`:
        sqrt_floor's clamp for v (0: none)."""
        beta1, beta2 = group["betas"]
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        p.addcdiv_(m, denominator(v, group["eps"], floor, scratch), value=-alpha)
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        """The same operations, each over all of `params` (one device and dtype) at once:
        on CUDA one kernel launch each instead of one per parameter. foreach has no
        sqrt into a given buffer, so sqrt(v) + eps is one temporary per parameter, which
        CUDA's caching allocator hands out without a trip to the driver."""
        beta1, beta2 = group["betas"]
        states, sizes = self._advance(group, params)
        grads = [p.grad for p in params]
        m = [state["exp_avg"] for state in states]
        v = [state["exp_avg_sq"] for state in states]
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
        denominators = torch._foreach_sqrt(v)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, m, denominators, [-alpha for alpha in sizes])
        if group["weight_decay"] > 0.0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])

    def _scratch_for(self, params: list[torch.Tensor]) -> torch.Tensor:
        """A flat buffer of params' device and dtype, as large as the largest of them. It
        holds nothing from one step to the next, so it is not in the state_dict."""
        key = (params[0].device, params[0].dtype)
        size = max(p.numel() for p in params)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = self._scratch[key] = torch.empty(size, device=key[0], dtype=key[1])
        return buffer


def denominator(v: torch.Tensor, eps: float, floor: float, out: torch.Tensor) -> torch.Tensor:
    """sqrt(v) + eps into `out`; v first clamped to `floor` (sqrt_floor: the same bits,
    without the slow sqrt of zeros) where it is > 0."""
    if floor > 0.0:
        return torch.clamp_min(v, floor, out=out).sqrt_().add_(eps)
    return torch.sqrt(v, out=out).add_(eps)


def sqrt_floor(eps: float, dtype: torch.dtype) -> float:
    """A clamp for v that leaves sqrt(v) + eps bit for bit as it is: the root of any v below
    it is under half an ulp of eps (in `dtype`), so the sum rounds to eps either way. Why:
    on x86 CPUs torch's sqrt is ~6x slower on exact zeros than on other inputs, and the
    word embedding's never-reached rows keep v = 0 (40% of them after 500 full-data steps).
    0 where eps (or that clamp) is not a normal number of `dtype`: then no clamp."""
    info = torch.finfo(dtype)
    eps = torch.tensor(eps, dtype=dtype).item()
    if not eps >= info.tiny or not math.isfinite(eps):
        return 0.0
    exponent = math.frexp(eps)[1] - 1  # eps in [2^exponent, 2^(exponent + 1)), exactly
    spacing = 2.0 ** exponent * info.eps  # between eps and the next float up
    floor = (spacing / 4) ** 2  # sqrt(floor) = spacing / 4 exactly: powers of two
    return floor if floor >= info.tiny else 0.0


def step_size(group: dict, t: int) -> float:
    """alpha at step t; written lr * (ratio), the order the reference computes it in, so
    that the float rounding is the same."""
    if not group["correct_bias"]:
        return group["lr"]
    beta1, beta2 = group["betas"]
    return group["lr"] * (math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t))


def by_device_and_dtype(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """params split by (device, dtype), in order: a foreach operation runs as one kernel
    only over tensors that share both, and the scratch buffer has one of each."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    return list(groups.values())
