"""Each task's encoder gradient from one packed pass (engine/task_grads.py) equals the
per-task passes of --no-packed up to float reassociation: every buffer row, parameter by
parameter (Linear, LayerNorm, the pooler, word / position / token-type embeddings), the
heads' gradients and the Gram matrix; cross- and bi-encoded pairs; the word embedding as
sparse rows, dense, or frozen; micro-batches accumulated; and a whole tiny run's dev
metrics for PCGrad, MGDA and GradNorm.

Tolerance (`close`): rtol 1e-5 and atol 1e-6 x the largest magnitude of the reference
buffer (or tensor), as tests/test_packed.py uses for the packed pass itself: the per-task
products sum the same terms in another order (one packed GEMM's row blocks against a
padded pass per task); found up to 4.4e-7. bf16 autocast: atol 5e-3 x that magnitude
(bf16 keeps 8 bits; found 4.2e-5).
"""
import json
import os

import pytest
import torch

import multitask_classifier as mtc
from bert import BertModel, Packing
from config import BertConfig
from engine import run
from engine.build import build_parts
from engine.combiner import Combiner
from engine.configs import MultitaskConfig
from engine.distributed import Dist
from engine.step import train_step
from engine.task_grads import PackedTaskPass
from helpers import to_hf_state_dict, write_checkpoint
from multitask_classifier import build_tasks
from pcgrad import PCGrad

from test_packed import BATCHES, NoStep
from test_training import run_args

CPU = Dist(0, 1, 0, torch.device("cpu"))


def close(a: torch.Tensor, b: torch.Tensor, what: str, scale: float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol * max(scale, 1e-30), msg=what)


def test_token_spans_are_each_batch_s_real_tokens():
    batches = [b() for b in BATCHES]
    packing = Packing.of(batches)
    counts = [int(b.attention_mask.sum()) for b in batches]
    assert packing.token_spans == [(sum(counts[:j]), sum(counts[:j + 1])) for j in range(3)]
    ids = packing.pack(packing.input_ids)
    for (first, end), batch in zip(packing.token_spans, batches):
        assert torch.equal(ids[first:end], batch.input_ids[batch.attention_mask.bool()])


def build(checkpoint, data, packed: bool, micro: int = 1, dense_words: bool = False, **flags):
    """A mix run's parts (model in eval mode: no dropout) and its drawn micro-batches: two
    examples each, `micro` of them per task (SST one fewer: a micro-batch without it)."""
    cfg = MultitaskConfig(checkpoint=checkpoint, data_dir=data, max_length=64, progress=False,
                          hidden_dropout_prob=0.0, aggregator="pcgrad", packed=packed,
                          grad_accumulation=micro, **flags)
    s = run.setup(cfg)
    tasks = build_tasks(cfg, s.tokenizer, s.encoder.config, ("train",))
    parts = build_parts(cfg, run.build_model(cfg, s.encoder, tasks, s.device), tasks, CPU)
    parts.model.eval()
    if dense_words:  # the word embedding in the buffer's dense part, as under torchrun
        parts.combiner = Combiner.build(cfg.combination(), parts.combiner.params, len(tasks),
                                        cfg.seed, CPU, micro)
    counts = [max(1, micro - 1)] + [micro] * (len(tasks) - 1)
    drawn = [([t.collate(t.train[2 * i:2 * i + 2]) for i in range(n)], 2 * n)
             for t, n in zip(tasks, counts)]
    return parts, drawn


def step(parts, drawn):
    """One combiner step that leaves the weights alone; the buffer's rows by parameter
    name and task, the heads' gradients, the Gram matrix; the encoder passes it took."""
    model, calls = parts.model, {"packed": 0, "padded": 0}
    for name, kind in (("forward_many", "packed"), ("forward", "padded")):
        original = getattr(model.encoder, name)

        def counted(*args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(*args, **kwargs)
        setattr(model.encoder, name, counted)
    buffer = parts.combiner.buffer
    buffer.grads[:, :buffer.dense_size] = float("nan")  # every dense row must be written
    _, gram, _ = train_step(parts.ctx, parts.tasks, drawn, NoStep(model.parameters()),
                            parts.combiner.for_step(0))
    names = {id(p): n for n, p in model.named_parameters()}
    rows = {(names[id(p)], k): buffer.task_views[k][i].clone()
            for k in range(buffer.num_tasks) for i, p in enumerate(buffer.params)}
    heads = {n: p.grad.clone() for n, p in model.heads.named_parameters() if p.grad is not None}
    return rows, heads, gram, calls


CASES = {  # flags, micro-batches, dense word rows
    "cross-sparse-words": ({"quora_encoding": "cross", "sts_encoding": "cross"}, 1, False),
    "bi-sparse-words": ({"quora_encoding": "bi", "sts_encoding": "bi"}, 1, False),
    "bi-dense-words": ({"quora_encoding": "bi", "sts_encoding": "bi"}, 1, True),
    # a two-head pair batch: B cross inputs and 2B single sentences in one batch
    "both-heads": ({"quora_encoding": "both", "sts_encoding": "both"}, 1, False),
    "frozen-words": ({"freeze_word_embeddings": True}, 1, False),
    "pooler": ({"pooling": "pooler"}, 1, False),
    "accumulate-2": ({"quora_encoding": "bi"}, 2, False),
    # the first micro-batch has no SST: no task in it reads the pooler
    "accumulate-3-pooler": ({"pooling": "pooler", "quora_encoding": "bi",
                             "freeze_word_embeddings": True}, 3, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_packed_pass_gives_each_task_s_gradient(tiny_checkpoint, tiny_data, case):
    flags, micro, dense = CASES[case]
    packed, drawn = build(tiny_checkpoint, tiny_data, True, micro, dense, **flags)
    reference, _ = build(tiny_checkpoint, tiny_data, False, micro, dense, **flags)
    rows, heads, gram, calls = step(packed, drawn)
    ref_rows, ref_heads, ref_gram, ref_calls = step(reference, drawn)
    assert calls == {"packed": micro, "padded": 0}  # one pass a micro-batch: the new path
    assert ref_calls == {"packed": 0, "padded": sum(len(micro) for micro, _ in drawn)}
    assert rows.keys() == ref_rows.keys()
    kinds = {name.split(".")[-2] if "layers" in name else name.rsplit(".", 1)[0]
             for name, _ in rows}
    expected = {"qkv", "attention_dense", "attention_layer_norm", "interm_dense", "out_dense",
                "out_layer_norm", "encoder.pos_embedding", "encoder.tk_type_embedding",
                "encoder.embed_layer_norm"}
    expected |= {"encoder.pooler_dense"} if flags.get("pooling") == "pooler" else set()
    expected |= set() if flags.get("freeze_word_embeddings") else {"encoder.word_embedding"}
    assert kinds == expected
    scale = max(row.abs().max().item() for row in ref_rows.values())
    for key in ref_rows:
        close(rows[key], ref_rows[key], f"{key}", scale)
    assert heads.keys() == ref_heads.keys() and heads
    head_scale = max(grad.abs().max().item() for grad in ref_heads.values())
    for name in ref_heads:
        close(heads[name], ref_heads[name], name, head_scale)
    close(gram, ref_gram, "Gram matrix", ref_gram.abs().max().item())


def test_bf16_autocast_per_task_gradients(tiny_checkpoint, tiny_data):
    flags = {"quora_encoding": "bi", "precision": "bf16", "pooling": "pooler"}
    packed, drawn = build(tiny_checkpoint, tiny_data, True, **flags)
    reference, _ = build(tiny_checkpoint, tiny_data, False, **flags)
    rows, _, _, calls = step(packed, drawn)
    ref_rows, _, _, _ = step(reference, drawn)
    assert calls["packed"] == 1
    scale = max(row.abs().max().item() for row in ref_rows.values())
    for key in ref_rows:
        assert rows[key].dtype == torch.float32
        close(rows[key], ref_rows[key], f"{key}", scale, atol=5e-3)


def test_a_parameter_the_path_does_not_cover_takes_the_per_task_passes(tiny_checkpoint, tiny_data):
    """A trainable encoder parameter outside the buffer would get no gradient from the
    one-pass backward: such a buffer falls back to one pass per task."""
    parts, drawn = build(tiny_checkpoint, tiny_data, True)
    encoder_params = [p for p in parts.model.encoder.parameters() if p.requires_grad]
    batches = [micro[0] for micro, _ in drawn]
    full = PCGrad(encoder_params, 3)
    assert PackedTaskPass.start(parts.ctx.local, full, [0, 1, 2], batches, [False] * 3)
    partial = PCGrad(encoder_params[1:], 3)
    assert PackedTaskPass.start(parts.ctx.local, partial, [0, 1, 2], batches, [False] * 3) is None
    parts.ctx.local.packed = False
    assert PackedTaskPass.start(parts.ctx.local, full, [0, 1, 2], batches, [False] * 3) is None


@pytest.fixture(scope="module")
def no_dropout_checkpoint(tmp_path_factory):
    """The tiny checkpoint's words, no dropout in the encoder: a packed run and a padded one
    then differ by float rounding only."""
    from conftest import SPECIAL, WORDS
    vocab = SPECIAL + WORDS
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("no_dropout"), config,
                            to_hf_state_dict(BertModel(config)), vocab=vocab)


def numbers(value, key: str = "") -> dict:
    """A metrics line's numbers by their path (`dev.sts`, ...)."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items() if name != "seconds"
                for k, v in numbers(item, f"{key}.{name}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{key}.{i}").items()}
    return {key: value}


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [numbers(json.loads(line)) for line in f]


@pytest.mark.parametrize("flags", [["--aggregator", "pcgrad"], ["--aggregator", "mgda"],
                                   ["--balance", "grad_norm"]], ids=["pcgrad", "mgda", "grad_norm"])
def test_a_run_matches_its_no_packed_run(no_dropout_checkpoint, tiny_data, tmp_path, flags):
    common = ["--hidden_dropout_prob", "0", "--epochs", "2", *flags]
    packed = mtc.main(run_args(no_dropout_checkpoint, tiny_data, tmp_path / "packed", *common))
    padded = mtc.main(run_args(no_dropout_checkpoint, tiny_data, tmp_path / "padded", *common,
                               "--no-packed"))
    got, expected = metrics(packed), metrics(padded)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and any(key.startswith(".dev.") for key in b)
        for key in b:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
            else:
                assert a[key] == b[key], key


@pytest.mark.parametrize("flags", [["--aggregator", "rlw", "--balance", "famo"],
                                   ["--balance", "uncertainty"]], ids=["rlw-famo", "uncertainty"])
def test_a_loss_only_run_matches_its_rows_run(no_dropout_checkpoint, tiny_data, tmp_path,
                                              monkeypatch, flags):
    """A combination that reads no Gram matrix takes its weights from the losses and runs one
    weighted backward (combiner.LossWeights: never the rows); diagnosed on every step, the
    same run takes the rows' path on every step. Same weights, same run up to float rounding."""
    from engine.combiner import Combiner
    calls = {"combine": 0, "weigh": 0}
    for name in calls:
        def spy(self, *args, _name=name, _original=getattr(Combiner, name)):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(Combiner, name, spy)
    common = ["--hidden_dropout_prob", "0", "--epochs", "2", *flags]
    by_losses = mtc.main(run_args(no_dropout_checkpoint, tiny_data, tmp_path / "losses", *common,
                                  "--no-grad_diagnostics"))
    assert calls == {"combine": 0, "weigh": 12}  # 6 steps an epoch
    by_rows = mtc.main(run_args(no_dropout_checkpoint, tiny_data, tmp_path / "rows", *common,
                                "--grad_diagnostics_every", "1"))
    assert calls == {"combine": 12, "weigh": 12}
    for a, b in zip(metrics(by_losses), metrics(by_rows), strict=True):
        shared = [k for k in b if k.startswith((".dev.", ".train_loss."))]
        assert len(shared) >= 6
        for key in shared:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
