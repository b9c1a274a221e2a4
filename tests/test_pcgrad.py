import math
import random

import pytest
import torch

from optimizer import AdamW
from pcgrad import (PCGrad, combine_weights, gradient_cosines, gram_matrix, project_coefficients,
                    project_conflicting, weighted_sum)


def rng(seed=0):
    return random.Random(seed)


def test_no_conflict_is_plain_sum():
    grads = torch.tensor([[1.0, 0.0, 1.0], [0.5, 2.0, 0.0], [0.0, 1.0, 1.0]])
    torch.testing.assert_close(project_conflicting(grads, rng()), grads.sum(0))


def test_two_conflicting_closed_form():
    g1, g2 = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 0.5])
    dot = g1 @ g2  # -0.5
    expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    torch.testing.assert_close(project_conflicting(torch.stack([g1, g2]), rng()), expected)


def test_two_tasks_result_agrees_with_both():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        grads = torch.randn(2, 10, generator=gen)
        update = project_conflicting(grads, rng())
        assert update @ grads[0] >= -1e-5 and update @ grads[1] >= -1e-5


def test_projection_uses_the_original_other_gradient():
    """Three tasks, worked by hand: g1 projected off g2, then off the original g3."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    # Orders drawn by the seeded rng decide the result; recompute it step by step.
    r = random.Random(5)
    expected = torch.zeros(2)
    for i in range(3):
        gi = g[i].clone()
        others = [j for j in range(3) if j != i]
        r.shuffle(others)
        for j in others:
            if gi @ g[j] < 0:
                gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        expected += gi
    torch.testing.assert_close(project_conflicting(g, random.Random(5)), expected)


def test_mean_is_sum_over_k():
    grads = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.3, -2.0]])
    total = project_conflicting(grads, rng(1), "sum")
    torch.testing.assert_close(project_conflicting(grads, rng(1), "mean"), total / 3)
    torch.testing.assert_close(project_conflicting(grads, rng(1), "mean", project=False),
                               grads.sum(0) / 3)


def test_zero_gradient_gives_no_nan():
    grads = torch.tensor([[0.0, 0.0], [-1.0, 0.5], [1.0, 1.0]])
    # By hand (any order: a zero g0 has dot 0 with everything, so it is never projected on
    # or off): g0' = 0; g1 . g2 = -0.5, ||g2||^2 = 2: g1' = g1 + 0.25 g2 = (-0.75, 0.75);
    # ||g1||^2 = 1.25: g2' = g2 + 0.4 g1 = (0.6, 1.2). Sum (-0.15, 1.95).
    for seed in range(4):
        torch.testing.assert_close(project_conflicting(grads, rng(seed)), torch.tensor([-0.15, 1.95]))
    # cos(g1, g2) = -0.5 / sqrt(1.25 * 2); the zero gradient's row and column are 0
    c = -0.5 / math.sqrt(2.5)
    torch.testing.assert_close(gradient_cosines(grads @ grads.T),
                               torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, c], [0.0, c, 1.0]]))


def test_same_seed_same_result():
    grads = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    grads[1] = -grads[0] + 0.1 * grads[1]
    torch.testing.assert_close(project_conflicting(grads, rng(7)), project_conflicting(grads, rng(7)))
    # and the seed matters: another one draws other orders, hence another update
    assert not torch.allclose(project_conflicting(grads, rng(7)), project_conflicting(grads, rng(8)))


class FixedOrder:
    """A stand-in for random.Random whose shuffle records the list and keeps or reverses it."""

    def __init__(self, reverse):
        self.reverse, self.calls = reverse, []

    def shuffle(self, items):
        self.calls.append(list(items))
        if self.reverse:
            items.reverse()


# g0 . g1 = -1, g0 . g2 = 0, g1 . g2 = -1; ||g0||^2 = 1, ||g1||^2 = 2, ||g2||^2 = 1
THREE = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])


def test_projection_order_comes_from_the_rng():
    """Worked by hand, each g_i projected off the others in the order the rng gives.
    Ascending order: g0 off g1: g0 + 1/2 g1 = (0.5, 0.5); off g2 (dot -0.5): + 0.5 g2 ->
    (0.5, 0). g1 off g0: g1 + g0 = (0, 1); off g2 (dot -1): + g2 -> (0, 0). g2 off g0: dot 0;
    off g1: g2 + 1/2 g1 = (-0.5, -0.5). Sum (0, -0.5).
    Descending order: g0 off g2: dot 0; off g1: (0.5, 0.5). g1 off g2: g1 + g2 = (-1, 0); off
    g0 (dot -1): + g0 -> (0, 0). g2 off g1: (-0.5, -0.5); off g0 (dot -0.5): + 0.5 g0 ->
    (0, -0.5). Sum (0.5, 0)."""
    ascending, descending = FixedOrder(reverse=False), FixedOrder(reverse=True)
    torch.testing.assert_close(project_conflicting(THREE, ascending), torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(project_conflicting(THREE, descending), torch.tensor([0.5, 0.0]))
    assert ascending.calls == [[1, 2], [0, 2], [0, 1]]  # each task's others, shuffled in turn
    # the coefficients C (g_i' = sum_m C[i, m] g_m) of the ascending order, from the above
    gram = (THREE @ THREE.T).double()
    torch.testing.assert_close(project_coefficients(gram, FixedOrder(reverse=False)),
                               torch.tensor([[1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [0.0, 0.5, 1.0]],
                                            dtype=torch.float64))
    # a real rng draws both orders' results across seeds
    results = {tuple(project_conflicting(THREE, rng(seed)).tolist()) for seed in range(20)}
    assert len(results) > 1


def test_combine_weights_by_hand():
    gram = (THREE @ THREE.T).double()
    # column sums of C above: (2, 2, 2.5); "mean" divides by K = 3
    w = torch.tensor([2.0, 2.0, 2.5], dtype=torch.float64)
    torch.testing.assert_close(combine_weights(gram, FixedOrder(False)), w)
    torch.testing.assert_close(combine_weights(gram, FixedOrder(False), reduction="mean"), w / 3)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(combine_weights(gram, rng(), project=False), ones)
    torch.testing.assert_close(combine_weights(gram, rng(), project=False, reduction="mean"), ones / 3)


def test_cosines():
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    cos = gradient_cosines(grads @ grads.T)
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0],
                                                  [-1.0, 0.0, 1.0]]))
    # norms 5, sqrt 2, 5; (3, 4) . (1, 1) = 7, (3, 4) . (4, -3) = 0, (1, 1) . (4, -3) = 1
    grads = torch.tensor([[3.0, 4.0], [1.0, 1.0], [4.0, -3.0]])
    c = 7 / (5 * math.sqrt(2))
    d = 1 / (5 * math.sqrt(2))
    torch.testing.assert_close(gradient_cosines(grads @ grads.T),
                               torch.tensor([[1.0, c, 0.0], [c, 1.0, d], [0.0, d, 1.0]]))


def test_gram_matrix_by_hand():
    grads = torch.tensor([[1.0, 2.0, 0.0, -1.0, 3.0], [0.0, 1.0, -2.0, 2.0, 1.0]])
    # 1+4+0+1+9 = 15; 0+2+0-2+3 = 3; 0+1+4+4+1 = 10 (block=2: two blocks and a tail of one)
    expected = torch.tensor([[15.0, 3.0], [3.0, 10.0]])
    for block in (1, 2, 3, 4096):
        torch.testing.assert_close(gram_matrix(grads, block=block), expected)


def two_task_model(seed=0):
    torch.manual_seed(seed)
    shared = torch.nn.Linear(3, 4)
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])
    x = torch.randn(5, 3)
    targets = [torch.randn(5, 1), -torch.randn(5, 1)]

    def losses():  # each task its own forward pass, as in training (one batch per task)
        return [((head(shared(x)) - t) ** 2).mean() for head, t in zip(heads, targets)]
    return shared, heads, losses


def per_task_flat_gradients(shared, heads, losses):
    grads = []
    for k in range(2):  # each task's gradients alone, by plain autograd
        shared.zero_grad(), heads.zero_grad()
        losses()[k].backward()
        grads.append(torch.cat([p.grad.flatten() for p in shared.parameters()]))
    shared.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("reduction, divisor", [("sum", 1), ("mean", 2)])
def test_wrapper_writes_back_the_projected_gradient(reduction, divisor):
    shared, heads, losses = two_task_model(seed=4)  # a seed whose two tasks conflict
    g1, g2 = per_task_flat_gradients(shared, heads, losses)
    dot = g1 @ g2
    assert dot < 0
    # two tasks, closed form: each projected off the other's original gradient
    expected = ((g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)) / divisor
    surgery = PCGrad(shared.parameters(), num_tasks=2, reduction=reduction, seed=0)
    gram = surgery.pc_backward(losses())
    written = [p.grad for p in shared.parameters()]
    torch.testing.assert_close(torch.cat([g.flatten() for g in written]), expected)
    assert [g.shape for g in written] == [p.shape for p in shared.parameters()]
    torch.testing.assert_close(gram, torch.stack([g1, g2]) @ torch.stack([g1, g2]).T)


def test_wrapper_seed_draws_the_orders():
    """Linear losses g_k . p have gradient exactly g_k: with the three tasks of THREE, the
    order matters, and the wrapper's orders are those of random.Random(seed), step after step."""
    p = torch.nn.Parameter(torch.zeros(2))
    results = set()
    for seed in range(6):
        surgery, reference = PCGrad([p], num_tasks=3, seed=seed), rng(seed)
        for _ in range(2):
            surgery.pc_backward([THREE[k] @ p for k in range(3)])
            torch.testing.assert_close(p.grad, project_conflicting(THREE, reference))
            results.add(tuple(p.grad.tolist()))
    assert len(results) > 1


def test_wrapper_projects_shared_and_leaves_heads_alone():
    shared, heads, losses = two_task_model()
    per_task = []
    for k in range(2):  # each task's gradients alone, by plain autograd
        shared.zero_grad(), heads.zero_grad()
        losses()[k].backward()
        per_task.append((torch.cat([p.grad.flatten() for p in shared.parameters()]),
                         heads[k].weight.grad.clone()))
    shared.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)
    surgery = PCGrad(shared.parameters(), num_tasks=2, seed=0)
    gram = surgery.pc_backward(losses())
    flat = torch.cat([p.grad.flatten() for p in shared.parameters()])
    expected = project_conflicting(torch.stack([g for g, _ in per_task]), rng(0))
    torch.testing.assert_close(flat, expected)
    torch.testing.assert_close(gram[0, 1], per_task[0][0] @ per_task[1][0])
    for k in range(2):
        torch.testing.assert_close(heads[k].weight.grad, per_task[k][1])


def test_wrapper_without_projection_is_the_sum():
    shared, heads, losses = two_task_model()
    sum(losses()).backward()
    plain = torch.cat([p.grad.flatten() for p in shared.parameters()])
    shared.zero_grad(set_to_none=True)
    PCGrad(shared.parameters(), num_tasks=2, project=False).pc_backward(losses())
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in shared.parameters()]), plain)


@pytest.mark.parametrize("make_opt", [lambda ps: AdamW(ps, lr=0.01),
                                      lambda ps: torch.optim.SGD(ps, lr=0.01)])
def test_wrapper_trains_with_our_and_torch_optimizers(make_opt):
    shared, heads, losses = two_task_model()
    opt = make_opt(list(shared.parameters()) + list(heads.parameters()))
    surgery = PCGrad(shared.parameters(), num_tasks=2)
    first = sum(l.item() for l in losses())
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        surgery.pc_backward(losses())
        opt.step()
    assert sum(l.item() for l in losses()) < first


def test_wrapper_with_one_shared_forward_pass():
    shared, heads, _ = two_task_model()
    x = torch.randn(5, 3)
    h = shared(x)
    losses = [head(h).pow(2).mean() for head in heads]
    PCGrad(shared.parameters(), num_tasks=2).pc_backward(losses, shared_graph=True)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared.parameters())


def test_wrapper_checks_arguments():
    shared, _, losses = two_task_model()
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(shared.parameters(), 2, reduction="max")
    with pytest.raises(ValueError, match="expected 3 losses"):
        PCGrad(shared.parameters(), 3).pc_backward(losses())


def test_gram_matrix_blocks_match_double_precision():
    grads = torch.randn(3, 3 * 4096 + 123, generator=torch.Generator().manual_seed(3))
    expected = grads.double() @ grads.double().T
    torch.testing.assert_close(gram_matrix(grads).double(), expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gram_matrix(grads, block=1000).double(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_weighted_sum_matches_double_precision(num_tasks):
    rows = torch.randn(num_tasks, 10_007, generator=torch.Generator().manual_seed(4))
    weights = [0.7, -1.25, 0.4][:num_tasks]
    out = torch.full((10_007,), float("nan"))  # every element must be written
    weighted_sum(rows, weights, out)
    expected = torch.tensor(weights, dtype=torch.float64) @ rows.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_each_step_overwrites_the_task_rows():
    """The buffer is never zeroed: each task's backward writes its row (a post-accumulate
    hook copies each gradient in), so stale values, even NaN, cannot leak into a step, and a
    shared parameter that a task does not reach gets a zero row."""
    shared, heads, losses = two_task_model()
    unused = torch.nn.Parameter(torch.ones(3))  # shared, but no task's loss reads it
    g1, g2 = per_task_flat_gradients(shared, heads, losses)
    surgery = PCGrad([*shared.parameters(), unused], num_tasks=2, project=False)
    for _ in range(2):
        surgery.grads.fill_(float("nan"))
        gram = surgery.pc_backward(losses())
        expected = torch.stack([torch.cat([g1, torch.zeros(3)]), torch.cat([g2, torch.zeros(3)])])
        torch.testing.assert_close(surgery.grads, expected)
        torch.testing.assert_close(gram, expected @ expected.T)
        torch.testing.assert_close(unused.grad, torch.zeros(3))
        assert all(head.weight.grad is not None for head in heads)  # no hook on the heads
        shared.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)


def embedding_tasks(seed):
    """Three tasks on an embedding + linear layer, each reading its own few token ids (the
    third none, on odd steps), so that most embedding rows get no gradient."""
    torch.manual_seed(seed)
    embedding, linear = torch.nn.Embedding(50, 6, padding_idx=0), torch.nn.Linear(6, 1)

    def losses(step):
        ids = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(step))
        out = [linear(embedding(ids[k])).pow(2).mean() * (k + 1) for k in range(3)]
        return out[:2] + [linear.weight.sum() ** 2] if step % 2 else out
    return [embedding.weight, *linear.parameters()], embedding.weight, losses


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sparse_rows_equal_the_dense_buffer(reduction):
    """SparseRows reads only the embedding rows some task reaches; the buffer, the Gram
    matrix and the update equal the dense computation's, step after step, as the rows change."""
    params, embedding, losses = embedding_tasks(seed=5)
    dense = PCGrad(params, 3, reduction=reduction, seed=1)
    sparse = PCGrad(params, 3, reduction=reduction, seed=1, sparse_rows=[embedding])
    assert sparse.dense_size == sum(p.numel() for p in params[1:])  # the embedding goes last
    for step in range(4):
        gram = dense.pc_backward(losses(step))
        expected = [p.grad.clone() for p in params]
        torch.testing.assert_close(sparse.pc_backward(losses(step)), gram, rtol=1e-6, atol=1e-7)
        for p, grad in zip(params, expected):
            torch.testing.assert_close(p.grad, grad, rtol=1e-6, atol=1e-7)
        position = {id(p): i for i, p in enumerate(dense.params)}
        for k in range(3):
            for view, p in zip(sparse.task_views[k], sparse.params):
                torch.testing.assert_close(view, dense.task_views[k][position[id(p)]])


def test_sparse_rows_arguments_and_nan():
    params, embedding, losses = embedding_tasks(seed=5)
    with pytest.raises(ValueError, match="sparse_rows"):
        PCGrad(params[1:], 3, sparse_rows=[embedding])  # not a shared parameter
    with pytest.raises(ValueError, match="sparse_rows"):
        PCGrad(params, 3, sparse_rows=[embedding], reduce=lambda grads: None)
    surgery = PCGrad(params, 3, sparse_rows=[embedding])
    step = losses(0)
    step[0] = step[0] * float("nan")  # a NaN gradient row is live: the Gram shows it
    assert not torch.isfinite(surgery.pc_backward(step).diagonal()[0])
