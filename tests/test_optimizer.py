import math

import pytest
import torch

import optimizer
from optimizer import AdamW


def run(opt_cls, grads, init, **kwargs):
    p = torch.nn.Parameter(init.clone())
    opt = opt_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def adamw_by_hand(p, grads, lr, b1, b2, eps, wd):
    """Kingma & Ba's Algorithm 1 with section 2's "efficient" bias correction, plus
    Loshchilov & Hutter's decoupled decay applied after the Adam step, one scalar at a time."""
    p, m, v = list(p), [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        alpha = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            p[i] = p[i] - alpha * m[i] / (math.sqrt(v[i]) + eps)
            p[i] = p[i] * (1 - lr * wd)
    return p


# eps = 0.1 is large on purpose: coordinate 0 (small gradients) is dominated by eps and
# coordinate 1 (large ones) by sqrt(v), so eps's place and the bias correction both show;
# wd = 0.5 makes "decay before the step" differ from "after" by ~1e-3.
LR, B1, B2, EPS, WD = 0.1, 0.9, 0.99, 0.1, 0.5
P0 = [1.0, -2.0]
GRADS = [[0.5, 4.0], [-0.2, 3.0], [0.1, -1.0]]


def test_first_step_worked_by_hand():
    got = run(AdamW, [torch.tensor(GRADS[0])], torch.tensor(P0), lr=LR, betas=(B1, B2), eps=EPS,
              weight_decay=WD)
    # t = 1: alpha = 0.1 sqrt(1 - 0.99) / (1 - 0.9) = 0.1; decay factor 1 - 0.1 * 0.5 = 0.95
    # p0:  m = 0.1 * 0.5 = 0.05, v = 0.01 * 0.25 = 0.0025, sqrt(v) = 0.05
    #      (1 - 0.1 * 0.05 / (0.05 + 0.1)) * 0.95 = (1 - 1/30) * 0.95 = 0.918333...
    # p1:  m = 0.4, v = 0.16, sqrt(v) = 0.4: (-2 - 0.1 * 0.4 / 0.5) * 0.95 = -2.08 * 0.95 = -1.976
    torch.testing.assert_close(got, torch.tensor([0.95 * 29 / 30, -1.976]), rtol=0, atol=1e-6)


def test_three_steps_with_weight_decay_by_hand():
    got = run(AdamW, [torch.tensor(g) for g in GRADS], torch.tensor(P0), lr=LR, betas=(B1, B2),
              eps=EPS, weight_decay=WD)
    expected = adamw_by_hand(P0, GRADS, LR, B1, B2, EPS, WD)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


def test_weight_decay_alone_shrinks_by_lr_times_wd():
    # a zero gradient leaves m = v = 0, so the Adam step is 0 and only p <- p (1 - lr wd) acts
    got = run(AdamW, [torch.zeros(2)] * 3, torch.tensor([2.0, -4.0]), lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(got, torch.tensor([2.0, -4.0]) * 0.95 ** 3)


def test_matches_torch_adamw_without_decay():
    torch.manual_seed(0)
    init = torch.randn(50)
    grads = [torch.randn(50) for _ in range(20)]
    ours = run(AdamW, grads, init, lr=1e-2, eps=1e-8)
    theirs = run(torch.optim.AdamW, grads, init, lr=1e-2, eps=1e-8, weight_decay=0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_without_bias_correction_first_step_is_lr_scaled():
    got = run(AdamW, [torch.tensor([4.0])], torch.tensor([0.0]), lr=1.0, betas=(0.9, 0.999),
              eps=0.0, correct_bias=False)
    # m = 0.1 * 4 = 0.4, v = 0.001 * 16 = 0.016, alpha = lr = 1: p = -m / sqrt(v) = -3.1623
    torch.testing.assert_close(got, torch.tensor([-0.4 / math.sqrt(0.016)]))
    # with the correction, alpha = sqrt(1 - 0.999) / (1 - 0.9): -sqrt(0.001) / 0.1 * 3.1623 = -1
    got = run(AdamW, [torch.tensor([4.0])], torch.tensor([0.0]), lr=1.0, betas=(0.9, 0.999),
              eps=0.0)
    torch.testing.assert_close(got, torch.tensor([-1.0]))


def test_param_groups_keep_their_own_settings():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = AdamW([{"params": [a], "lr": 0.0}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(1), torch.ones(1)
    opt.step()
    assert a.item() == 1.0 and b.item() < 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "learning rate"), ({"betas": (1.0, 0.999)}, "beta"),
    ({"betas": (0.9, -0.1)}, "beta"), ({"eps": -1.0}, "epsilon"),
    ({"weight_decay": -0.1}, "weight_decay")])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW(emb.parameters()).step()


def test_skips_parameters_without_gradient():
    p = torch.nn.Parameter(torch.ones(2))
    AdamW([p], lr=0.1, weight_decay=0.5).step()
    assert p.tolist() == [1.0, 1.0]


class ReferenceAdamW(torch.optim.Optimizer):
    """The starter's per-parameter step (this project's optimizer.py before it took a
    scratch buffer and foreach operations), kept here as the reference it must equal."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])


def random_params(seed=0):
    """Shapes from a vector to a matrix, one transposed (not contiguous), one of 7
    elements (not a multiple of a vector width)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(5, generator=g), torch.randn(33, 17, generator=g),
               torch.randn(16, 48, generator=g).t(), torch.randn(7, generator=g),
               torch.randn(300, generator=g)]
    return [torch.nn.Parameter(t.clone()) for t in tensors]


def train(opt_cls, params, steps, seed=1, first=0, **kwargs):
    """`steps` steps on two groups (their own lr and decay, one without bias correction),
    random gradients; params[3] has none on odd steps, so its own step count falls behind
    (`first` numbers the steps, so a resumed run continues the same pattern)."""
    opt = kwargs.pop("opt", None) or opt_cls(
        [{"params": params[:3], "weight_decay": 0.01},
         {"params": params[3:], "lr": 3e-3, "correct_bias": False}],
        lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, **kwargs)
    g = torch.Generator().manual_seed(seed)
    for step in range(first, first + steps):
        for i, p in enumerate(params):
            p.grad = None if i == 3 and step % 2 else torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def assert_same_bits(params, opt, ref_params, ref_opt):
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        mine, theirs = opt.state[p], ref_opt.state[q]
        assert mine.keys() == theirs.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert mine["step"] == theirs["step"]
        assert torch.equal(mine["exp_avg"], theirs["exp_avg"])
        assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])


@pytest.mark.parametrize("foreach", [None, False, True])
def test_steps_equal_the_reference_bitwise(foreach):
    """Same operations in the same order: the same bits, per parameter or foreach (on a
    CPU foreach loops over the same kernels), skipped parameters and all."""
    params, ref_params = random_params(), random_params()
    opt = train(AdamW, params, 6, foreach=foreach)
    ref_opt = train(ReferenceAdamW, ref_params, 6)
    assert opt.state[params[3]]["step"] == 3 and opt.state[params[0]]["step"] == 6
    assert_same_bits(params, opt, ref_params, ref_opt)


@pytest.mark.parametrize("chunk", [64, 100])
def test_chunked_steps_equal_the_reference_bitwise(monkeypatch, chunk):
    """Parameters larger than optimizer.CHUNK are stepped a chunk at a time (64 or 100 here:
    561 and 300 elements in 9 or 6 chunks, the last one short; the transposed, non-contiguous
    one whole): the same bits as the reference's whole-tensor step."""
    monkeypatch.setattr(optimizer, "CHUNK", chunk)
    params, ref_params = random_params(), random_params()
    opt = train(AdamW, params, 6, foreach=False)
    ref_opt = train(ReferenceAdamW, ref_params, 6)
    assert_same_bits(params, opt, ref_params, ref_opt)


@pytest.mark.parametrize("saved_by", [AdamW, ReferenceAdamW])
def test_state_dict_round_trips(saved_by, tmp_path):
    """A state saved after 3 steps (by this optimizer, or by the reference's layout that
    older checkpoints hold), through torch.save/load, continues as if never stopped; the
    state_dict holds no scratch buffer and no foreach choice."""
    params = random_params()
    saved = train(saved_by, params, 3).state_dict()
    torch.save(saved, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW([{"params": resumed[:3]}, {"params": resumed[3:]}])
    opt.load_state_dict(loaded)
    train(AdamW, resumed, 3, first=3, opt=opt)
    straight = random_params()
    ref_opt = train(ReferenceAdamW, straight, 3)
    train(ReferenceAdamW, straight, 3, first=3, opt=ref_opt)
    assert_same_bits(resumed, opt, straight, ref_opt)
    state = opt.state_dict()
    reference_groups = ref_opt.state_dict()["param_groups"]
    assert [g.keys() for g in state["param_groups"]] == [g.keys() for g in reference_groups]
    assert all(v.keys() == {"step", "exp_avg", "exp_avg_sq"} for v in state["state"].values())


def test_cpu_step_allocates_no_temporaries():
    """After the first step (which makes the state and the scratch buffer) a CPU step only
    writes into tensors it already has: every operation it runs returns an alias of one
    of its inputs (in place, out=, or a view). `v.sqrt()` would make one per parameter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(r.alias_info is None and "Tensor" in str(r.type)
                   for r in func._schema.returns):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    params = random_params()
    opt = train(AdamW, params, 1)
    for p in params:
        p.grad = torch.randn(p.shape)
    with Allocations() as seen:
        opt.step()
        opt.step()
    assert seen.ops == []


def test_a_deep_copy_steps_like_the_original():
    """torch's Optimizer pickles only defaults, state and param_groups: the copy must
    still find its foreach choice and a scratch buffer."""
    import copy
    params = random_params()
    opt = train(AdamW, params, 2, foreach=False)
    twin_params, twin = copy.deepcopy((params, opt))  # one memo: twin's state keys twin_params
    assert twin.foreach is False
    train(AdamW, params, 2, first=2, opt=opt)
    train(AdamW, twin_params, 2, first=2, opt=twin)
    assert_same_bits(params, opt, twin_params, twin)
def test_the_reused_denominator_changes_no_number():
    """sqrt(v) + eps goes into one scratch tensor sized by the largest parameter and shared
    by all (a smaller one after it reuses its start): the updates stay those of the formula
    with fresh temporaries, bit for bit."""
    shapes = [(3,), (50, 7), (4, 4)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    by_formula = [p.detach().clone() for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in by_formula]
    opt = AdamW(params, lr=0.1, betas=(0.9, 0.999), eps=1e-3, weight_decay=0.1)
    for t in range(1, 5):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        step = 0.1 * math.sqrt(1.0 - 0.999 ** t) / (1.0 - 0.9 ** t)
        for p, (m, v), g in zip(by_formula, moments, grads):
            m.mul_(0.9).add_(g, alpha=1.0 - 0.9)
            v.mul_(0.999).addcmul_(g, g, value=1.0 - 0.999)
            p.addcdiv_(m, v.sqrt().add_(1e-3), value=-step)
            p.mul_(1.0 - 0.1 * 0.1)
        for p, expected in zip(params, by_formula):
            assert torch.equal(p.detach().view(torch.int32), expected.view(torch.int32)), t
    assert [s.numel() for s in opt._scratch.values()] == [350]


@pytest.mark.parametrize("eps", [1e-6, 1e-8, 1e-3, 1.0, float.fromhex("0x1.fffffep-1")])
def test_the_sqrt_floor_leaves_every_denominator_as_it_is(eps):
    """v is clamped to sqrt_floor before the root (sqrt is slow on zeros): sqrt(v) + eps
    keeps its bits for zeros, values at and around the floor, subnormals, NaN and inf."""
    floor = optimizer.sqrt_floor(eps, torch.float32)
    assert floor > 0.0  # the clamped path is the one taken at these eps
    around = torch.tensor([floor], dtype=torch.float64) * torch.logspace(-12, 12, 241, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-40, floor, float("nan"), float("inf"), 1.0])
    v = torch.cat([around.float(), special, torch.rand(10_000) ** 8])
    plain, clamped = torch.sqrt(v).add_(eps), torch.clamp_min(v, floor).sqrt_().add_(eps)
    assert torch.equal(plain.view(torch.int32), clamped.view(torch.int32))


def test_no_floor_where_eps_is_not_a_normal_float():
    assert optimizer.sqrt_floor(0.0, torch.float32) == 0.0
    assert optimizer.sqrt_floor(1e-12, torch.float32) == 0.0  # the floor itself would be subnormal
    assert optimizer.sqrt_floor(1e-12, torch.float64) > 0.0


def test_rows_without_gradient_step_like_the_reference_bitwise():
    """An embedding-like parameter whose unreached rows keep v = 0 (the clamped path's
    case) and rows of tiny gradients (v near the floor): the reference's bits."""
    g = torch.Generator().manual_seed(3)
    init = torch.randn(40, 8, generator=g)
    init[5:10] = 0.0  # so that their tiny updates show in the bits
    params, ref_params = [torch.nn.Parameter(init.clone())], [torch.nn.Parameter(init.clone())]
    opt, ref = AdamW(params, lr=1e-2, eps=1e-6), ReferenceAdamW(ref_params, lr=1e-2, eps=1e-6)
    for step in range(4):
        grad = torch.randn(40, 8, generator=g)
        grad[10:] = 0.0  # rows 10.. never reached
        grad[5:10] *= 1e-14  # v ~ 1e-28: just below and above the floor
        for p, o in ((params[0], opt), (ref_params[0], ref)):
            p.grad = grad.clone()
            o.step()
    assert (opt.state[params[0]]["exp_avg_sq"] == 0).sum() == 30 * 8
    assert_same_bits(params, opt, ref_params, ref)
