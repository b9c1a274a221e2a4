"""The training-loss and learning-rate options (engine/losses.py, engine/layer_decay.py):
R-Drop, CoSENT, label smoothing and layer-wise lr decay, each by value on a hand example,
R-Drop's second pass in both step paths, their refusals, and tiny runs with all of them."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import multitask_classifier as mtc
from bert import BertModel
from engine import run
from engine.build import make_optimizer
from engine.cli import parse_config
from engine.distributed import Dist
from engine.errors import ConfigError
from engine.losses import configure_losses, cosent_loss, fold, symmetric_kl
from engine.row_gradients import RowGradEmbedding, use_row_gradients
from engine.specs import SPECS
from engine.step import make_context
from engine.tasks import Task

from test_training import run_args

P, Q = (0.5, 0.5), (0.9, 0.1)
# 1/2 (KL(P||Q) + KL(Q||P)) by hand: KL(P||Q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
# = 0.5108256, KL(Q||P) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.3680642
SYMMETRIC_KL_PQ = 0.5 * (0.5108256237659907 + 0.3680642071684971)


def logits(*probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_symmetric_kl_of_two_known_distributions():
    assert symmetric_kl(logits(P), logits(Q)).item() == pytest.approx(SYMMETRIC_KL_PQ, abs=1e-12)
    assert symmetric_kl(logits(Q), logits(P)).item() == pytest.approx(SYMMETRIC_KL_PQ, abs=1e-12)
    # the mean over rows: a second row with equal distributions halves it
    assert symmetric_kl(logits(P, P), logits(Q, P)).item() == pytest.approx(SYMMETRIC_KL_PQ / 2)


def task(name: str, weight: float = 1.0, rdrop: float = 0.0) -> Task:
    return Task(SPECS[name], None, None, 1, weight=weight, rdrop=rdrop)


def test_rdrop_loss_is_the_mean_of_the_two_losses_plus_alpha_times_the_consistency():
    """Weight 2, alpha 0.5: 2 * (mean of the two cross-entropies + 0.5 * the symmetric KL);
    Quora's logits 0 and ln 9 are the Bernoullis (0.5, 0.5) and (0.1, 0.9); STS's is the MSE
    of the two scores. A task without R-Drop keeps its plain loss."""
    tasks = {"sst": task("sst", 2.0, 0.5), "quora": task("quora", 1.0, 0.5),
             "sts": task("sts", 1.0, 0.5), "aux": Task(SPECS["sst"], None, None, 1)}
    names = ["sst", "quora", "sts", "aux"]
    labels = [torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0, 2.0]), torch.tensor([1])]
    first = [logits(P), torch.tensor([0.0], dtype=torch.float64),
             torch.tensor([1.0, 2.0]), logits(Q)]
    second = [logits(Q), torch.tensor([math.log(9.0)], dtype=torch.float64), torch.tensor([2.0, 4.0])]
    batches = [SimpleNamespace(labels=y) for y in labels]
    losses = fold(tasks, names, first + second, batches)
    sst = 2.0 * (0.5 * (-math.log(0.5) - math.log(0.9)) + 0.5 * SYMMETRIC_KL_PQ)
    quora = 0.5 * (-math.log(0.5) - math.log(0.9)) + 0.5 * SYMMETRIC_KL_PQ
    sts = 0.5 * (0.0 + (1.0 + 4.0) / 2) + 0.5 * (1.0 + 4.0) / 2  # MSEs 0 and 2.5; between 2.5
    expected = [sst, quora, sts, -math.log(0.1)]
    assert [x.item() for x in losses] == pytest.approx(expected, abs=1e-6)


def test_cosent_of_three_pairs_by_hand():
    """cos (0.2, 0.5, 0.1) with labels (1, 4, 2.5): the ordered pairs (label_i > label_j)
    are (2nd, 1st), (2nd, 3rd), (3rd, 1st), so the loss is
    log(1 + e^{20 (0.2 - 0.5)} + e^{20 (0.1 - 0.5)} + e^{20 (0.2 - 0.1)})."""
    output = 5.0 * torch.tensor([0.2, 0.5, 0.1], dtype=torch.float64)  # the head's 5 cos
    labels = torch.tensor([1.0, 4.0, 2.5], dtype=torch.float64)
    by_hand = math.log(1 + math.exp(-6) + math.exp(-8) + math.exp(2))
    assert cosent_loss(output, labels).item() == pytest.approx(by_hand, abs=1e-12)
    # ties are no pairs: equal labels leave log(1) = 0
    assert cosent_loss(output, torch.full((3,), 2.0, dtype=torch.float64)).item() == 0.0


def configured(**options) -> dict:
    cfg = mtc.MultitaskConfig(**options)
    tasks = [task(name) for name in ("sst", "quora", "sts")]
    configure_losses(cfg, tasks)
    return {t.name: t for t in tasks}


def test_label_smoothing_by_the_formula():
    """-(1 - eps) log p_y - eps / C sum_c log p_c over SST's 5 classes; Quora's one logit
    with target y (1 - eps) + eps / 2; STS and an unlisted task unchanged."""
    eps = 0.1
    tasks = configured(label_smoothing=eps, label_smoothing_tasks="sst,quora")
    out, y = torch.tensor([[1.0, -0.5, 0.3, 2.0, 0.0]], dtype=torch.float64), torch.tensor([3])
    log_p = F.log_softmax(out, -1)[0]
    manual = -(1 - eps) * log_p[3] - eps / 5 * log_p.sum()
    assert tasks["sst"].loss(out, y).item() == pytest.approx(manual.item(), abs=1e-12)
    z, target = 0.7, 1 * (1 - eps) + eps / 2
    sigmoid = 1 / (1 + math.exp(-z))
    manual = -(target * math.log(sigmoid) + (1 - target) * math.log(1 - sigmoid))
    logit = torch.tensor([z], dtype=torch.float64)
    assert tasks["quora"].loss(logit, torch.tensor([1])).item() == pytest.approx(manual, abs=1e-12)
    # ... which is torch's 2-class label smoothing on the logits (0, z)
    two = F.cross_entropy(torch.tensor([[0.0, z]], dtype=torch.float64), torch.tensor([1]),
                          label_smoothing=eps)
    assert two.item() == pytest.approx(manual, abs=1e-12)
    assert tasks["sts"].loss_fn is None
    assert configured(label_smoothing=eps)["quora"].loss_fn is None  # the default lists sst


def test_defaults_leave_the_losses_and_groups_as_they_were():
    tasks = configured()
    assert all(t.loss_fn is None and t.rdrop == 0.0 for t in tasks.values())
    assert configured(sts_loss="cosent")["sts"].loss_fn is cosent_loss
    assert [t.rdrop for t in configured(rdrop=0.5, rdrop_tasks="quora").values()] == [0, 0.5, 0]
    assert [t.rdrop for t in configured(rdrop=0.5).values()] == [0.5, 0.5, 0.5]


# --- layer-wise lr decay ---------------------------------------------------------------


def group_of(optimizer) -> dict:
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in found, "a parameter in two groups"
            found[id(p)] = group
    return found


def expected_lr(name: str, lr: float, head_lr: float, decay: float, layers: int) -> float:
    """The formula, from the parameter's name: layer l (1-based) of L at lr D^(L - l), the
    embeddings at lr D^L, the pooler and the heads at head_lr."""
    if name.startswith("bert_layers."):
        return lr * decay ** (layers - (int(name.split(".")[1]) + 1))
    if name.startswith("pooler_dense.") or name.startswith("head."):
        return head_lr
    return lr * decay ** layers


@pytest.mark.parametrize("freeze_words", [False, True])
def test_layer_decay_gives_every_parameter_its_layers_rate(tiny_config, freeze_words):
    """On the tiny config (L = 2), the word embedding wrapped for row gradients as a CPU run
    has it; a warmup of 2 of 10 steps scales every group alike."""
    encoder, head = BertModel(tiny_config), torch.nn.Linear(32, 5)
    if freeze_words:
        encoder.word_embedding.requires_grad_(False)
    assert use_row_gradients(encoder, torch.device("cpu"), False) is not freeze_words
    cfg = mtc.MultitaskConfig(lr=1e-3, head_lr=1e-2, layer_decay=0.5, warmup_ratio=0.2,
                              freeze_word_embeddings=freeze_words)
    optimizer, _ = make_optimizer(list(encoder.parameters()), head.parameters(), cfg, 10, encoder)
    assert [g["name"] for g in optimizer.param_groups] == ["layer 2", "layer 1", "embeddings", "heads"]
    assert [g["lr"] * 2 for g in optimizer.param_groups] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1e-2])
    groups = group_of(optimizer)
    named = [*encoder.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    for name, p in named:
        if not p.requires_grad:
            assert id(p) not in groups, name
            continue
        assert groups[id(p)]["initial_lr"] == pytest.approx(
            expected_lr(name, 1e-3, 1e-2, 0.5, 2), rel=1e-12), name
    assert len(groups) == sum(p.requires_grad for _, p in named)


def test_the_row_gradient_word_embedding_moves_at_the_embeddings_rate(tiny_config):
    """One AdamW step from zero moments moves each reached weight by about its rate."""
    encoder, head = BertModel(tiny_config), torch.nn.Linear(32, 1)
    use_row_gradients(encoder, torch.device("cpu"), False)
    assert isinstance(encoder.word_embedding, RowGradEmbedding)
    cfg = mtc.MultitaskConfig(lr=1e-3, head_lr=1e-3, layer_decay=0.5)
    optimizer, _ = make_optimizer(list(encoder.parameters()), head.parameters(), cfg, 10, encoder)
    before = encoder.word_embedding.weight.detach().clone()
    ids = torch.randint(5, 100, (3, 7))
    head(encoder(ids).last_hidden_state.mean(1)).sum().backward()
    optimizer.step()
    moved = (encoder.word_embedding.weight.detach() - before).abs()
    assert moved.max().item() == pytest.approx(2.5e-4, rel=0.05)


def test_an_encoder_parameter_in_no_layer_is_an_error(tiny_config):
    encoder = BertModel(tiny_config)
    encoder.extra = torch.nn.Linear(2, 2)
    cfg = mtc.MultitaskConfig(layer_decay=0.9)
    with pytest.raises(ValueError, match="in no layer: extra.weight, extra.bias"):
        make_optimizer(list(encoder.parameters()), [], cfg, 10, encoder)


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags, match", [
    (["--sts_loss", "cosent", "--sts_encoding", "cross"], "--sts_loss cosent needs"),
    (["--sts_loss", "cosent", "--tasks", "sst"], "--sts_loss cosent needs"),
    (["--label_smoothing", "0.1", "--label_smoothing_tasks", "sst,sts"], "sts is a regression"),
    (["--label_smoothing", "0.1", "--tasks", "sts"], "--label_smoothing_tasks names sst, not among the trained"),
    (["--label_smoothing", "1"], "--label_smoothing must be"),
    (["--rdrop", "1", "--rdrop_tasks", "aux"], "--rdrop_tasks names aux, not among the trained"),
    (["--rdrop_tasks", "ssts"], "--rdrop_tasks names ssts, not among the tasks"),
    (["--rdrop", "-1"], "--rdrop must be"),
    (["--layer_decay", "0"], r"--layer_decay must be in \(0, 1\]"),
    (["--layer_decay", "1.5"], r"--layer_decay must be in \(0, 1\]"),
    (["--layer_decay", "nan"], r"--layer_decay must be in \(0, 1\]"),
])
def test_options_that_cannot_act_are_refused_by_name(flags, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(mtc.MultitaskConfig, flags)


# --- R-Drop in the step ----------------------------------------------------------------


@pytest.fixture
def rdrop_setup(tiny_checkpoint, tiny_data):
    cfg = mtc.MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64,
                              progress=False, rdrop=1.0, rdrop_tasks="sst,sts")
    s = run.setup(cfg)
    tasks = mtc.build_tasks(cfg, s.tokenizer, s.encoder.config, ("train",))
    model = run.build_model(cfg, s.encoder, tasks, s.device)
    batches = [t.collate(t.train[:3]) for t in tasks]
    return model, tasks, batches


@pytest.mark.parametrize("packed, per_task", [(True, False), (False, False), (True, True)],
                         ids=["packed", "no-packed", "per-task"])
def test_rdrop_runs_its_tasks_twice_with_other_dropout_in_every_path(rdrop_setup, packed, per_task):
    """The chosen tasks' heads see their batch twice (the same packed pass, or a second
    per-task pass). Without dropout the two passes agree and the loss is the plain one;
    with it they differ, and the loss is R-Drop's of the two outputs the heads returned."""
    model, tasks, batches = rdrop_setup
    names = [t.name for t in tasks]
    seen = {n: [] for n in names}
    for name in names:
        model.heads[name].register_forward_hook(lambda m, i, out, n=name: seen[n].append(out.float()))
    losses = make_context(model, tasks, Dist(0, 1, 0, torch.device("cpu")), model.precision,
                          find_unused=False, packed=packed).local
    with torch.no_grad():
        model.eval()
        quiet = losses(names, batches, per_task)
        assert {n: len(v) for n, v in seen.items()} == {"sst": 2, "quora": 1, "sts": 2}
        torch.testing.assert_close(seen["sst"][0], seen["sst"][1], rtol=1e-5, atol=1e-6)
        plain = [t.loss(seen[t.name][0], b.labels) for t, b in zip(tasks, batches)]
        torch.testing.assert_close(torch.stack(quiet), torch.stack(plain), rtol=1e-5, atol=1e-6)
        model.train()
        seen = {n: [] for n in names}
        noisy = losses(names, batches, per_task)
    (a, b), labels = seen["sst"], batches[0].labels
    assert not torch.allclose(a, b)
    assert noisy[0].item() == pytest.approx(
        (0.5 * (F.cross_entropy(a, labels) + F.cross_entropy(b, labels)) + symmetric_kl(a, b)).item())
    (a, b), labels = seen["sts"], batches[2].labels
    assert not torch.allclose(a, b)
    assert noisy[2].item() == pytest.approx(
        (0.5 * (F.mse_loss(a, labels) + F.mse_loss(b, labels)) + F.mse_loss(a, b)).item())
    assert noisy[1].item() == pytest.approx(F.binary_cross_entropy_with_logits(
        seen["quora"][0], batches[1].labels.float()).item())


# --- tiny runs ---------------------------------------------------------------------------

ALL_FOUR = ["--rdrop", "0.5", "--rdrop_tasks", "sst,quora,sts", "--sts_loss", "cosent",
            "--layer_decay", "0.8", "--label_smoothing", "0.1", "--label_smoothing_tasks", "sst,quora"]


@pytest.mark.parametrize("extra", [["--packed"], ["--no-packed"], ["--aggregator", "pcgrad", "--packed"],
                                   ["--aggregator", "pcgrad", "--no-packed"], ["--mode", "seq"]],
                         ids=["packed", "no-packed", "pcgrad-packed", "pcgrad-no-packed", "seq"])
def test_a_run_with_all_four_options_trains(tiny_checkpoint, tiny_data, tmp_path, extra):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                *ALL_FOUR, *extra))
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert (saved["rdrop"], saved["sts_loss"], saved["layer_decay"], saved["label_smoothing"]) == \
        (0.5, "cosent", 0.8, 0.1)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert all(math.isfinite(v) for v in record["train_loss"].values())
    assert set(record["dev"]) == {"sst", "quora", "sts"}


def test_a_run_saved_before_these_options_resumes(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    """An older run's config.json and last.pt lack the new keys: they count as the defaults."""
    from engine.fingerprint import FINGERPRINT
    from test_resume_checks import interrupted
    run_dir = tmp_path / "run"
    interrupted(monkeypatch, mtc.main, run_args(tiny_checkpoint, tiny_data, run_dir, "--epochs", "1"))
    new = ("rdrop", "rdrop_tasks", "sts_loss", "label_smoothing", "label_smoothing_tasks",
           "layer_decay")
    config = json.load(open(run_dir / "config.json"))
    json.dump({k: v for k, v in config.items() if k not in new}, open(run_dir / "config.json", "w"))
    last = torch.load(run_dir / "last.pt", weights_only=True)
    for key in new:
        del last[FINGERPRINT]["config"][key]
    torch.save(last, run_dir / "last.pt")
    mtc.main(["--resume", str(run_dir), "--no-progress"])
    assert os.path.exists(run_dir / "summary.json")


def test_runs_with_these_options_are_rows_of_their_own():
    from analysis.results import config_name, config_slug
    plain = mtc.MultitaskConfig().as_dict()
    assert config_name(plain) == "finetune-mix (0.3)"
    changed = {**plain, "rdrop": 1.0, "rdrop_tasks": "sst", "sts_loss": "cosent",
               "label_smoothing": 0.1, "layer_decay": 0.8}
    assert config_name(changed) == ("finetune-mix + R-Drop 1 (sst) + cosent STS loss + label "
                                    "smoothing 0.1 (sst) + layer decay 0.8 (0.3)")
    assert config_slug(changed) == ("finetune-mix-r-drop-1-sst-cosent-sts-loss-label-smoothing-"
                                    "0-1-sst-layer-decay-0-8-0.3")
