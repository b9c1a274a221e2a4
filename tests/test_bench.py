"""The benchmarks' shared pieces (bench/limits.py, bench/phases.py): the FLOP formula, the
CPU description, the GEMM rate and the phase clock on the real train_step. Nothing here
asserts a speed: the machine running the tests is not a quiet one."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.limits import (ADAMW_FUSED_ACCESSES, CpuInfo, adamw_bytes, copy_gbps, encoder_flops,
                          gemm_gflops, layer_flops, parse_cpuinfo, peak_for, Peaks, step_flops)
from bench.phases import PHASES, PhaseClock
from config import BertConfig

TINY = BertConfig(vocab_size=50, hidden_size=4, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=8, max_position_embeddings=16)


def hand_count(length: int) -> int:
    """TINY's forward GEMMs of one layer on one sequence, product by product."""
    hidden, inter = 4, 8
    qkv = 3 * 2 * length * hidden * hidden
    scores = 2 * length * length * hidden  # 2 heads x (L, 2) @ (2, L)
    context = 2 * length * length * hidden  # 2 heads x (L, L) @ (L, 2)
    output = 2 * length * hidden * hidden
    ffn = 2 * length * hidden * inter + 2 * length * inter * hidden
    return qkv + scores + context + output + ffn


def test_flop_formula_matches_a_hand_count():
    assert hand_count(3) == 288 + 72 + 72 + 96 + 384 == 912
    assert layer_flops(3, 4, 8) == 912
    assert encoder_flops(TINY, [3], passes=1) == 2 * 912  # two layers
    assert encoder_flops(TINY, [3, 4]) == 3 * 2 * (912 + hand_count(4))  # + backward, 2x


def test_step_flops_count_real_and_padded_tokens():
    masks = [torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([[1, 1]])]
    flops = step_flops(TINY, masks)
    assert (flops.real_tokens, flops.padded_tokens) == (9, 10)
    assert flops.real == 6 * (hand_count(3) + hand_count(4) + hand_count(2))
    assert flops.padded == 6 * (2 * hand_count(4) + hand_count(2))
    assert step_flops(TINY, masks, passes=1).padded * 3 == flops.padded


def test_flop_formula_matches_torchs_count_of_the_encoder():
    """The formula against torch's own FLOP counter on our encoder (forward and backward):
    equal but for the pooler's one (H, H) product per sequence (left out by design)."""
    from bert import BertModel
    model = BertModel(TINY)
    ids = torch.randint(5, 50, (3, 6))
    mask = torch.ones_like(ids)  # unpadded: the fused attention computes L x L either way
    with FlopCounterMode(display=False) as counter:
        model(ids, attention_mask=mask).last_hidden_state.sum().backward()
    pooler = 3 * 2 * TINY.hidden_size ** 2  # its forward on 3 sequences (no loss reads it)
    assert counter.get_total_flops() - pooler == step_flops(TINY, [mask]).padded


def test_adamw_traffic_in_bytes():
    assert adamw_bytes(1000, ADAMW_FUSED_ACCESSES) == 28_000  # read p, g, m, v; write p, m, v


SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: another
flags\t\t: fpu
"""
EPYC = "processor : 0\nmodel name : AMD EPYC 7B12\nflags : fpu sse avx avx2 fma\n"


@pytest.mark.parametrize("text, model, native, described", [
    (SAPPHIRE, "Intel(R) Xeon(R) Platinum 8480+", True,
     "avx2 yes, avx512f yes, avx512_bf16 yes, amx yes"),
    (EPYC, "AMD EPYC 7B12", False, "avx2 yes, avx512f no, avx512_bf16 no, amx no"),
    ("", None, False, "instruction flags unknown"),
])
def test_cpu_flags_parser(text, model, native, described):
    cpu = parse_cpuinfo(text)
    if model is not None:
        assert cpu.model == model
    assert cpu.native_bf16 is native
    assert described in cpu.describe()


def test_peak_for_uses_bf16_only_where_it_was_measured():
    peaks = Peaks([("2048^3", (2048, 2048, 2048), 100.0, None)], 10.0, False)
    assert peak_for(peaks, "fp32") == (100.0, "fp32")
    assert peak_for(peaks, "bf16") == (100.0, "fp32 (bf16 emulated)")
    peaks.rows[0] = ("2048^3", (2048, 2048, 2048), 100.0, 400.0)
    assert peak_for(peaks, "bf16") == (400.0, "bf16")


def test_measured_rates_are_positive_on_tiny_shapes():
    assert gemm_gflops(4, 8, 3, repeats=1, min_seconds=0.0) > 0
    assert copy_gbps(megabytes=1, repeats=1) > 0
    assert CpuInfo("x", frozenset()).native_bf16 is False


def test_phase_clock_times_each_part_of_the_real_train_step(tiny_checkpoint, tiny_data):
    """bench.mix's phases on the engine's train_step: the forward, backward and optimizer
    are seen in every method, the combination in the per-task ones only (not FAMO's: its
    weights come from the losses, before one backward), and the clock leaves no hook or
    wrapper behind."""
    from bench.mix import PLAIN, make_methods, mix_step, time_phases
    from bench import multitask_model
    from multitask_classifier import MultitaskConfig
    from optimizer import AdamW
    cfg = MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64,
                          progress=False)
    _, tasks, model = multitask_model(cfg, ("train",))
    model.train()
    model.train_encoder(True)
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    methods = make_methods(shared, [model.encoder.word_embedding.weight], len(tasks), "pcgrad,famo")
    steps = [[t.collate(t.train[:4]) for t in tasks]] * 2
    optimizer = AdamW(model.parameters(), lr=1e-5)
    phases = time_phases(model, tasks, steps, optimizer, methods, rounds=1)
    assert set(phases) == set(methods)
    for name, spent in phases.items():
        assert list(spent) == list(PHASES)
        assert all(spent[p] > 0 for p in ("forward", "backward", "optimizer")), (name, spent)
        assert (spent["combination"] > 0) is (name not in (PLAIN, "sum + famo")), (name, spent)
    for combiner in methods.values():
        assert combiner is None or "combine" not in vars(combiner)
    mix_step(model, tasks, steps[0], optimizer, methods["pcgrad"])  # unwatched: nothing marks
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert PhaseClock(torch.device("cpu")).take() == dict.fromkeys(PHASES, 0.0)


def test_packed_encoder_row_runs_the_packed_pass_with_equal_outputs(tiny_config):
    """bench.encoder's "ours packed" row: forward_many behind the padded call's signature,
    the same parameters; outputs equal at the real tokens, zeros at the padding."""
    from bench.encoder import BenchConfig, PackedEncoder, random_batch
    from bert import BertModel
    tiny_config.hidden_dropout_prob = tiny_config.attention_probs_dropout_prob = 0.0
    tiny_config.vocab_size = 1100  # random_batch draws ids from 1000 up
    encoder = BertModel(tiny_config)
    batch = random_batch(BenchConfig(batch_size=4, seq_len=16), tiny_config.vocab_size)
    packed = PackedEncoder(encoder)
    assert list(packed.parameters()) == list(encoder.parameters())
    calls = []
    handle = encoder.register_forward_hook(lambda *_: calls.append("padded"))
    out = packed(**batch)
    handle.remove()
    assert calls == []  # not the padded forward
    ref = encoder(**batch)
    real = batch["attention_mask"].bool()
    assert not real.all()
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real],
                               rtol=1e-5, atol=1e-5)
    assert not out.last_hidden_state[~real].any()
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


def test_evaluation_bench_batchings_cover_each_example_once(tiny_checkpoint, tiny_data, capsys):
    """bench.evaluation: each batching holds every dev example once, the sorted ones in
    length order, and the three give the same outputs up to float rounding."""
    import re
    from bench.evaluation import BATCHINGS, main
    main(["--checkpoint", tiny_checkpoint, "--data_dir", tiny_data, "--max_length", "64",
          "--rounds", "1"])
    out = capsys.readouterr().out
    for name in BATCHINGS:
        line = next(row for row in out.splitlines() if row.strip().startswith(f"{name}:"))
        difference = float(re.search(r"difference from it (\S+)$", line).group(1))
        assert difference < 1e-5, line
    from engine import run
    from multitask_classifier import MultitaskConfig, build_tasks
    cfg = MultitaskConfig(checkpoint=tiny_checkpoint, data_dir=tiny_data, max_length=64)
    s = run.setup(cfg)
    for task in build_tasks(cfg, s.tokenizer, s.encoder.config, ("dev",)):
        examples = task.examples("dev")
        lengths = task.collate.lengths(examples)
        for name, batching in BATCHINGS.items():
            order = [i for batch in batching(task, examples) for i in batch]
            assert sorted(order) == list(range(len(examples))), (task.name, name)
            if name != "file order, 64":
                assert [lengths[i] for i in order] == sorted(lengths), (task.name, name)


@pytest.mark.parametrize("flags, rows, trained, fused", [
    ([], True, True, True), (["--no-row_gradients"], False, True, True),
    (["--freeze_word_embeddings"], False, False, True), (["--no-fused_attention"], True, True, False)])
def test_mix_bench_sets_the_encoder_up_as_the_trainer_does(tiny_checkpoint, tiny_data, flags,
                                                           rows, trained, fused, capsys):
    """bench.mix times the trainer's step: the word embedding's row gradients on a CPU
    (engine/build.py installs them), none when it is frozen; a frozen one takes no step;
    SDPA's attention unless --no-fused_attention asks for the explicit form."""
    from bench.mix import MixBenchConfig, build_model, main
    from engine.cli import parse_config
    from engine.row_gradients import RowGradEmbedding
    args = ["--checkpoint", tiny_checkpoint, "--data_dir", tiny_data, "--max_length", "64", *flags]
    *_, model = build_model(parse_config(MixBenchConfig, args))
    assert isinstance(model.encoder.word_embedding, RowGradEmbedding) is rows
    assert model.encoder.word_embedding.weight.requires_grad is trained
    assert all(layer.self_attention.fused is fused for layer in model.encoder.bert_layers)
    if not trained:  # the whole bench once (its peak measurements take seconds)
        main(args + ["--steps", "1", "--rounds", "1", "--methods", "pcgrad", "--phase_rounds", "0",
                     "--profile", "1", "--profile_top", "3"])
        out = capsys.readouterr().out
        assert "pcgrad" in out
        table = out[out.index("Operators (torch.profiler"):].splitlines()[1:]
        assert "pcgrad" in table[0] and len(table) == 1 + 3 + 2  # head, 3 operators, others, total
        assert table[-1].split()[0] == "total" and float(table[-1].split()[1]) > 0


def test_profile_table_lists_the_top_operators_and_differences_from_the_plain_step():
    from bench.profiles import OTHERS, profile_lines
    profiles = {"plain": {"aten::mm": 100.0, "aten::add_": 5.0, "aten::fill_": 1.0},
                "pcgrad": {"aten::mm": 101.0, "aten::bmm": 9.0, "aten::add_": 12.0, "aten::fill_": 1.5}}
    lines = profile_lines(profiles, "plain", top=3)
    cells = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(cells) == ["aten::mm", "aten::add_", "aten::bmm", OTHERS.split()[0], "total"]
    assert cells["aten::bmm"] == ["0.00", "9.00", "+9.00"]
    assert cells["aten::add_"] == ["5.00", "12.00", "+7.00"]
    assert cells["(all"][-3:] == ["1.00", "1.50", "+0.50"]  # fill_, outside the top 3
    assert cells["total"] == ["106.00", "123.50", "+17.50"]


def test_adamw_bench_times_both_denominators_on_a_saved_state(tmp_path, capsys):
    """bench.adamw reads v from a run's last.pt (its first optimizer's state), times the
    plain and the floored sqrt(v) + eps, and says whether they agree bit for bit."""
    from bench.adamw import main, saved_v
    v = torch.rand(3, 500) ** 8
    v[1] = 0.0  # an unreached row
    state = {"state": {0: {"exp_avg_sq": v}, 1: {"exp_avg_sq": torch.ones(7)}}}
    torch.save({"optimizers": {"mix": state}}, tmp_path / "last.pt")
    assert torch.equal(saved_v(str(tmp_path / "last.pt")), torch.cat([v.reshape(-1), torch.ones(7)]))
    main(["--state", str(tmp_path / "last.pt"), "--rounds", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "1,507 elements, 33.2% exact zeros" in out and "the same bits: True" in out


def test_combination_bench_ways_agree_and_fill_the_buffer_as_a_backward_would():
    """bench.combination: the per-parameter writes fill the (K, P) buffer with each task's
    gradient, the per-parameter Gram sums to the whole one, and every alternative agrees
    with ours (a wrong one would stop the bench)."""
    from bench.combination import differences, ways, write_rows
    torch.manual_seed(0)
    sizes = [5, 4096 + 7, 3, 9000]
    grads = [torch.randn(sum(sizes)) for _ in range(3)]
    buffer = torch.zeros(3, sum(sizes))
    whole = write_rows(buffer, grads, sizes, gram_each=False)
    assert torch.equal(buffer, torch.stack(grads))
    assert torch.allclose(write_rows(buffer, grads, sizes, gram_each=True), whole, rtol=1e-5)
    assert torch.allclose(whole.double(), buffer.double() @ buffer.double().T, rtol=1e-5, atol=1e-3)
    named = ways(buffer, grads, sizes, [0.5, -1.0, 2.0])
    found = differences(named)
    assert set(found) == {name for name, (reference, _) in named.items() if reference}
    assert torch.allclose(named["weighted sum: ours"][1](),
                          0.5 * grads[0] - grads[1] + 2.0 * grads[2], atol=1e-5)
    broken = {**named, "weighted sum: chunked": ("weighted sum: ours", lambda: buffer[0])}
    with pytest.raises(RuntimeError, match="weighted sum: chunked differs"):
        differences(broken)


def test_encoder_bench_pairs_ratios_within_one_precision():
    """bench.encoder --bf16 times every row again in bf16: each ratio compares rows of one
    precision, and each bf16 row is also set against its own fp32 row."""
    from bench.encoder import ratio_pairs
    rows = ["ours", "ours packed", "transformers"]
    results = dict.fromkeys(rows + [f"{r} bf16" for r in rows], {})
    pairs = ratio_pairs(results)
    assert ("ours packed", "ours") in pairs and ("ours packed bf16", "ours bf16") in pairs
    assert ("ours packed", "transformers") in pairs
    assert ("ours packed bf16", "transformers bf16") in pairs
    assert {("ours bf16", "ours"), ("transformers bf16", "transformers")} <= set(pairs)
    for row, base in pairs:  # never fp32 over bf16's base, nor bf16 over another fp32 row
        assert row.endswith(" bf16") == base.endswith(" bf16") or row == f"{base} bf16"
    assert ratio_pairs({"ours": {}}) == []
