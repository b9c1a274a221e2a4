"""distributed.py: samplers and accounting in-process; the collectives with 2 CPU (gloo)
processes spawned once for the module, each writing its results for the tests to check."""
import os
from typing import Sequence
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.utils.data import BatchSampler, RandomSampler

from engine import distributed as D
from engine.sharding import shard_range, shard_within_batches
import pcgrad
from datasets import BucketBatchSampler, ShuffledBatches
from optimizer import AdamW

WORLD = 2
DIM_IN, DIM_HID, DIM_OUT = 5, 7, 3


# --- samplers (no process group) -----------------------------------------------------------


def loss_scales(counts: Sequence[int]) -> list[float]:
    """One factor per task for this rank's mean losses, from this rank's part sizes
    `counts` (one per task): n_r W / sum_r n_r, so that the plain mean of the gradients
    over ranks is exactly the gradient of the mean loss over the global batch even when
    the parts are unequal (1.0 when they are equal). One small all-reduce."""
    if not D.active():
        return [1.0] * len(counts)
    local = torch.tensor(list(counts), dtype=torch.float64, device=D._collective_device())
    total = local.clone()
    torch_dist.all_reduce(total)
    scale = local * torch_dist.get_world_size() / total.clamp(min=1)
    return scale.tolist()


def global_samplers(n=23, batch=4):
    lengths = [(i * 7) % 11 for i in range(n)]
    return {
        "bucket": lambda: BucketBatchSampler(lengths, batch, seed=3, chunk_batches=2),
        "shuffle": lambda: BatchSampler(RandomSampler(range(n), generator=torch.Generator()
                                                      .manual_seed(3)), batch, False),
        "shuffled_batches": lambda: ShuffledBatches(n, batch, seed=3),
    }


def epochs(sampler, count=2):
    return [list(sampler) for _ in range(count)]


@pytest.mark.parametrize("kind", ["bucket", "shuffle", "shuffled_batches"])
def test_within_batch_shards_split_every_global_batch(kind):
    make = global_samplers()[kind]
    reference = epochs(make())  # one process, global batches of 4 (the last of 23 has 3)
    per_rank = [epochs(shard_within_batches(make(), r, WORLD)) for r in range(WORLD)]
    for epoch, batches in enumerate(reference):
        parts = [ranks[epoch] for ranks in per_rank]
        assert len({len(p) for p in parts}) == 1  # every rank takes as many steps
        assert [sum(group, []) for group in zip(*parts)] == batches  # rank order = batch order
        assert sorted(i for p in parts for b in p for i in b) == list(range(23))  # once each
        for group in zip(*parts):  # contiguous parts differing by at most one
            assert max(map(len, group)) - min(map(len, group)) <= 1
    assert reference[0] != reference[1]  # the epoch counter / generator still advances
    assert epochs(shard_within_batches(make(), 1, WORLD)) == per_rank[1]  # deterministic
    assert len(shard_within_batches(make(), 0, WORLD)) == len(per_rank[0][0])


def test_within_batch_drops_a_batch_smaller_than_the_world():
    make = lambda: ShuffledBatches(9, 4, seed=0)  # noqa: E731  4, 4, 1
    shards = [shard_within_batches(make(), r, WORLD) for r in range(WORLD)]
    parts = [list(s) for s in shards]
    assert [len(p) for p in parts] == [2, 2] == [len(s) for s in shards]
    assert sorted(i for p in parts for b in p for i in b) != list(range(9))
    assert len({i for p in parts for b in p for i in b}) == 8


def test_shard_range_covers_once_in_order():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert [i for r in ranges for i in r] == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_single_process_is_a_no_op(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist = D.init_distributed(use_gpu=False)
    assert dist == D.Dist(0, 1, 0, torch.device("cpu")) and dist.is_main
    assert not torch_dist.is_initialized()
    t = torch.arange(3.0)
    assert D.all_reduce_mean_(t.clone(), count=5).tolist() == t.tolist()
    assert loss_scales([3, 2]) == [1.0, 1.0]
    assert D.gather_predictions(["a"], [1], []) == (["a"], [1], [])
    D.barrier()
    D.shutdown()


def test_allreduce_bytes():
    from bench.dist import allreduce_bytes, ring_bytes_per_rank
    assert allreduce_bytes(1000) == 4000
    assert allreduce_bytes(1000, torch.bfloat16) == 2000
    assert ring_bytes_per_rank(4000, 2) == 4000 and ring_bytes_per_rank(4000, 1) == 0


# --- two gloo processes --------------------------------------------------------------------

def make_data(n, seed, tasks=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, DIM_IN, generator=gen), torch.randn(n, DIM_OUT, generator=gen))
            for _ in range(tasks)]


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, DIM_HID), torch.nn.Tanh(),
                               torch.nn.Linear(DIM_HID, DIM_OUT))


def flat_params(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def train_plain(optimizer_name, rank=0, world=1, steps=3):
    """3 steps on global batches 4, 4, 3 of 11 examples (the last split 2/1 on 2 ranks)."""
    (x, y), = make_data(11, seed=1)
    model = make_model(seed=rank)  # ranks start different: broadcast makes them equal
    D.broadcast_parameters_(model)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer_name == "sgd"
           else AdamW(model.parameters(), lr=0.01, weight_decay=0.01))
    sampler = shard_within_batches(ShuffledBatches(11, 4, seed=2), rank, world)
    for _, part in zip(range(steps), sampler):
        opt.zero_grad(set_to_none=True)
        scale, = loss_scales([len(part)])
        loss = torch.nn.functional.mse_loss(model(x[part]), y[part]) * scale
        loss.backward()
        D.all_reduce_grads_(model.parameters())
        opt.step()
    return flat_params(model)


def forever(sampler):
    while True:
        yield from sampler


class MultiTask(torch.nn.Module):
    def __init__(self, tasks=2):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(DIM_IN, DIM_HID), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(DIM_HID, DIM_OUT) for _ in range(tasks))


def train_pcgrad(rank=0, world=1, steps=3):
    """PCGrad over 2 tasks; the per-task (K, P) rows are averaged over ranks between the
    per-task backward passes and the Gram matrix (the hook pcgrad.py needs, emulated by
    wrapping the module's gram_matrix, which pc_backward calls on self.grads first)."""
    data = make_data(11, seed=5, tasks=2)
    data[1] = (data[1][0], -data[1][1] + 0.3)  # targets that make the tasks conflict
    torch.manual_seed(0)
    model = MultiTask()
    surgery = pcgrad.PCGrad(model.encoder.parameters(), 2, project=True, seed=0)
    opt = AdamW(model.parameters(), lr=0.01)
    samplers = [shard_within_batches(ShuffledBatches(11, b, seed=k), rank, world)
                for k, b in enumerate((4, 6))]  # 4,4,3 / 6,5: uneven parts in both
    grams = []
    for _, parts in zip(range(steps), zip(*(forever(s) for s in samplers))):
        opt.zero_grad(set_to_none=True)
        scales = loss_scales([len(p) for p in parts])
        losses = [torch.nn.functional.mse_loss(head(model.encoder(x[p])), y[p]) * s
                  for head, (x, y), p, s in zip(model.heads, data, parts, scales)]
        grams.append(surgery.pc_backward(losses))
        D.all_reduce_grads_(model.heads.parameters())
        opt.step()
    return flat_params(model), torch.stack(grams)


def reducing_gram_matrix(grads, *args, **kwargs):
    D.all_reduce_mean_(grads)  # the proposed hook: surgery.reduce_grads(self.grads)
    return ORIGINAL_GRAM(grads, *args, **kwargs)


ORIGINAL_GRAM = pcgrad.gram_matrix


def worker(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    dist = D.init_distributed(use_gpu=False)
    try:
        results = {"dist": (dist.rank, dist.world_size, dist.local_rank, str(dist.device),
                            dist.is_main)}
        results["sgd"] = train_plain("sgd", rank, world)
        results["adamw"] = train_plain("adamw", rank, world)
        pcgrad.gram_matrix = reducing_gram_matrix
        results["pcgrad"] = train_pcgrad(rank, world)
        pcgrad.gram_matrix = ORIGINAL_GRAM
        # Weighted mean with one count per row: rows (r + 1) * [1, 2] weighted by (k + 1, r).
        t = torch.tensor([[1.0, 2.0], [1.0, 2.0]]) * (rank + 1)
        results["weighted"] = D.all_reduce_mean_(t, count=torch.tensor([1.0 + rank, rank]))
        items = [f"id{i}" for i in range(7)]
        part = shard_range(len(items), rank, world)
        results["gathered"] = D.gather_predictions(
            [items[i] for i in part], [i * 0.5 for i in part], [i % 2 for i in part])
        D.barrier()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        D.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (torch_dist.is_available() and torch_dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path_factory.mktemp("dist"))
    # Forked from a parent that has torch and the optimizers' lazy imports (torch._dynamo,
    # seconds) loaded already: spawning would pay both in each process. The parent holds no
    # process group, and conftest keeps it to one intra-op thread.
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    mp.start_processes(worker, args=(WORLD, free_port(), out), nprocs=WORLD, join=True,
                       start_method="fork")
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def test_ranks_know_their_place(ranks):
    assert [r["dist"] for r in ranks] == [(0, 2, 0, "cpu", True), (1, 2, 1, "cpu", False)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_two_ranks_equal_one_process_on_the_global_batch(ranks, optimizer):
    single = train_plain(optimizer)
    for r in ranks:
        torch.testing.assert_close(r[optimizer], single, rtol=0, atol=1e-6)
    assert torch.equal(ranks[0][optimizer], ranks[1][optimizer])


def test_pcgrad_on_reduced_task_rows(ranks):
    (p0, g0), (p1, g1) = ranks[0]["pcgrad"], ranks[1]["pcgrad"]
    assert torch.equal(p0, p1) and torch.equal(g0, g1)  # same weights, same update everywhere
    single, grams = train_pcgrad()
    assert (grams[:, 0, 1] < 0).any()  # the projection did something
    torch.testing.assert_close(p0, single, rtol=0, atol=1e-6)
    torch.testing.assert_close(g0, grams, rtol=1e-5, atol=1e-7)


def test_weighted_mean_per_row(ranks):
    # row 0: (1 * 1 + 2 * 2) / 3; row 1: rank 0 counts 0, rank 1 counts 1 -> rank 1's row
    expected = torch.tensor([[5 / 3, 10 / 3], [2.0, 4.0]])
    for r in ranks:
        torch.testing.assert_close(r["weighted"], expected)


def test_gather_equals_the_single_process_order(ranks):
    items = [f"id{i}" for i in range(7)]
    expected = (items, [i * 0.5 for i in range(7)], [i % 2 for i in range(7)])
    assert all(tuple(r["gathered"]) == expected for r in ranks)


class ListCollate:
    def __call__(self, examples):
        return [e.id for e in examples]

    def lengths(self, examples):
        return [len(e.id) for e in examples]


@pytest.mark.parametrize("bucket", [False, True])
def test_train_streams_split_global_batches_over_ranks_and_micro_batches(bucket):
    """2 ranks x 2 micro-batches of b = one process's batch of 4b, example for example."""
    from datasets import Example, TrainStream
    examples = [Example(f"e{i}" * (1 + i % 3), ("x",)) for i in range(29)]

    def steps(stream, n):
        return [stream.next_step() for _ in range(n)]
    single = TrainStream(examples, ListCollate(), 8, bucket, seed=1)
    split = [TrainStream(examples, ListCollate(), 2, bucket, seed=1, micro=2, rank=r, world_size=2)
             for r in range(2)]
    assert len(single) == len(split[0]) == len(split[1]) == 4  # 8, 8, 8, 5
    reference = steps(single, 8)  # two passes
    per_rank = [steps(s, 8) for s in split]
    for (batches, size), (part0, size0), (part1, size1) in zip(reference, *per_rank):
        assert size == size0 == size1 == len(batches[0])
        assert sum(part0 + part1, []) == batches[0]  # rank order, then micro-batch order
        assert all(1 <= len(m) <= 2 for m in part0 + part1)
    assert reference[:4] != reference[4:]  # the second pass is reshuffled
    # the resumable position counts global batches on every rank alike
    assert split[0].state_dict() == split[1].state_dict() == single.state_dict()
