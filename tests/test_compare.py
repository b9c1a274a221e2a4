import json
import math
import os

import pytest

from analysis import compare
from analysis import plots
import report
from analysis import results
from test_report import MIX, PCGRAD, PNG_SIGNATURE, write_run

SUM = dict(MIX, aggregator="sum", balance="none")
UPGRAD = dict(SUM, aggregator="upgrad")
MGDA = dict(SUM, aggregator="mgda")
DWA = dict(SUM, balance="dwa")
PCG = dict(PCGRAD, aggregator="pcgrad", balance="none")


def epochs(overalls):
    """Per-epoch records whose sst/quora/sts are overall + 0.1 / + 0.2 / - 0.1."""
    return [(o + 0.1, o + 0.2, o - 0.1, o) for o in overalls]


@pytest.fixture
def methods_runs(tmp_path):
    root = str(tmp_path / "runs")
    # sum: best overall per seed 0.70, 0.72, 0.68 (seed 1's best is epoch 2, not the last)
    for seed, curve in enumerate(([0.60, 0.65, 0.70], [0.62, 0.72, 0.66], [0.64, 0.66, 0.68])):
        write_run(root, f"sum-s{seed}", SUM, seed, epochs(curve))
    # upgrad: best 0.71, 0.75, 0.70 -> differences 0.01, 0.03, 0.02: small, t = 2 sqrt(3)
    for seed, best in enumerate((0.71, 0.75, 0.70)):
        write_run(root, f"upgrad-s{seed}", UPGRAD, seed, epochs([best - 0.05, best]))
    # mgda: +0.10, +0.11, +0.12 on every seed: large and consistent
    for seed, best in enumerate((0.80, 0.83, 0.80)):
        write_run(root, f"mgda-s{seed}", MGDA, seed, epochs([best]))
    # dwa: +0.05, -0.04, +0.01: noise
    for seed, best in enumerate((0.75, 0.68, 0.69)):
        write_run(root, f"dwa-s{seed}", DWA, seed, epochs([best]))
    # pcgrad: seed 0 only paired; seed 5 has no sum run; seed 1 diverged (left out)
    write_run(root, "pcg-s0", PCG, 0, epochs([0.60, 0.69, 0.66]))
    write_run(root, "pcg-s5", PCG, 5, epochs([0.70, 0.72]))
    write_run(root, "pcg-s1", PCG, 1, epochs([0.3]), complete=False)
    with open(os.path.join(root, "pcg-s1", "diverged.json"), "w") as f:
        json.dump({"step": 3}, f)
    return root


def by_name(result):
    return {e["name"]: e for e in result["methods"]}


def test_paired_differences_and_t_statistic_by_hand(methods_runs):
    result = compare.compare(results.group_runs(results.find_runs(methods_runs)))
    methods = by_name(result)
    assert list(methods) == ["finetune-mix (0.3)", "finetune-mix + dwa balance (0.3)",
                             "finetune-mix + PCGrad (0.3)", "finetune-mix + mgda (0.3)",
                             "finetune-mix + upgrad (0.3)"]  # table order
    base = methods["finetune-mix (0.3)"]
    assert base["is_base"] and base["diff"] == {}
    assert base["mean"]["overall"] == pytest.approx(0.70)
    assert base["std"]["overall"] == pytest.approx(0.02)
    assert base["mean"]["sst"] == pytest.approx(0.80)  # the best epoch's sst, not the last's

    up = methods["finetune-mix + upgrad (0.3)"]["diff"]["overall"]
    assert up["seeds"] == [0, 1, 2] and up["diffs"] == pytest.approx([0.01, 0.03, 0.02])
    assert up["mean"] == pytest.approx(0.02)
    # sd of (0.01, 0.03, 0.02) is 0.01: t = 0.02 / (0.01 / sqrt 3); for 2 degrees of
    # freedom P(|T| >= t) = 1 - t / sqrt(t^2 + 2)
    t = 0.02 / (0.01 / math.sqrt(3))
    assert up["t"] == pytest.approx(t) and up["df"] == 2
    assert up["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert up["p"] == pytest.approx(0.0742, abs=1e-4)
    assert up["verdict"] == "within noise"  # p >= 0.05 although every seed gained
    # sst is overall + 0.1 in every record: the same differences
    assert methods["finetune-mix + upgrad (0.3)"]["diff"]["sst"]["mean"] == pytest.approx(0.02)


def test_t_distribution_against_closed_forms():
    for t in (0.3, 1.0, 2.5, 10.0):
        assert compare.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t))
        assert compare.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert compare.t_two_sided_p(0.0, 7) == pytest.approx(1.0)
    assert compare.t_two_sided_p(2.262157, 9) == pytest.approx(0.05, abs=1e-6)  # t table
    assert compare.t_two_sided_p(2.570582, 5) == pytest.approx(0.05, abs=1e-6)


def test_bootstrap_interval_holds_the_mean_and_is_deterministic():
    diffs = [0.01, -0.02, 0.04, 0.015, 0.0]
    low, high = compare.bootstrap_interval(diffs)
    assert low < sum(diffs) / len(diffs) < high
    assert min(diffs) <= low and high <= max(diffs)
    assert compare.bootstrap_interval(diffs) == (low, high)
    assert compare.bootstrap_interval(diffs, seed=1) != (low, high)  # the seed does matter


def test_within_noise_flips_for_a_large_consistent_difference(methods_runs):
    methods = by_name(compare.compare(results.group_runs(results.find_runs(methods_runs))))
    mgda = methods["finetune-mix + mgda (0.3)"]["diff"]["overall"]
    assert mgda["mean"] == pytest.approx(0.11)
    assert mgda["ci"][0] > 0 and mgda["p"] < 0.05 and mgda["verdict"] == "better"
    dwa = methods["finetune-mix + dwa balance (0.3)"]["diff"]["overall"]
    assert dwa["ci"][0] < 0 < dwa["ci"][1] and dwa["verdict"] == "within noise"
    pcg = methods["finetune-mix + PCGrad (0.3)"]
    assert pcg["diff"]["overall"]["seeds"] == [0]  # seed 5 has no sum run to pair with
    assert pcg["diff"]["overall"]["verdict"] == "n/a" and pcg["diff"]["overall"]["p"] is None
    assert pcg["left_out"] == {"diverged": 1, "incomplete": 0} and pcg["seeds"] == [0, 5]


def test_swings_and_spread_by_hand(methods_runs):
    methods = by_name(compare.compare(results.group_runs(results.find_runs(methods_runs))))
    stab = methods["finetune-mix (0.3)"]["stability"]["overall"]
    # |changes|: seed 0 (0.05, 0.05), seed 1 (0.10, 0.06), seed 2 (0.02, 0.02)
    assert stab["swing"] == pytest.approx((0.05 + 0.08 + 0.02) / 3)
    assert stab["std_final"] == pytest.approx(0.02)  # final 0.70, 0.66, 0.68
    assert stab["std_best"] == pytest.approx(0.02)  # best 0.70, 0.72, 0.68
    pcg = methods["finetune-mix + PCGrad (0.3)"]["stability"]["overall"]
    assert pcg["swing"] == pytest.approx((0.06 + 0.02) / 2)  # seed 0 (0.09, 0.03), seed 5 (0.02)
    assert methods["finetune-mix + mgda (0.3)"]["stability"]["overall"]["swing"] is None  # 1 epoch


def test_report_writes_the_comparison(methods_runs, tmp_path):
    out = str(tmp_path / "out")
    files = report.write_report(methods_runs, out)["files"]
    for name in ("comparison.md", "comparison.json", "comparison.png", "table.md"):
        assert os.path.join(out, name) in files
    with open(os.path.join(out, "comparison.png"), "rb") as f:
        assert f.read().startswith(PNG_SIGNATURE)
    with open(os.path.join(out, "comparison.md")) as f:
        text = f.read()
    assert "paired t-test" in text and "bootstrap 95% interval" in text
    assert "| finetune-mix + mgda (0.3) | 3 | " in text and "better" in text
    assert "| finetune-mix + PCGrad (0.3) (left out: 1 diverged) | 2 |" in text
    assert "### finetune-mix + PCGrad (0.3) against finetune-mix (0.3)" in text
    assert "| epoch-to-epoch swing | Overall | 0.050 | 0.040 | -0.010 |" in text
    with open(os.path.join(out, "comparison.json")) as f:
        first = f.read()
    report.write_report(methods_runs, out)
    with open(os.path.join(out, "comparison.json")) as f:
        assert f.read() == first  # the bootstrap is seeded


def test_one_method_writes_no_comparison_and_removes_a_stale_one(tmp_path, capsys):
    root = str(tmp_path / "r")
    out = os.path.join(root, "report")
    write_run(root, "sum-s0", SUM, 0, epochs([0.7]))
    write_run(root, "mgda-s0", MGDA, 0, epochs([0.8]))
    report.write_report(root)
    assert os.path.isfile(os.path.join(out, "comparison.md"))
    # pairs exist, but a single seed: no interval, still a point in the figure
    assert os.path.isfile(os.path.join(out, "comparison.png"))
    import shutil
    shutil.rmtree(os.path.join(root, "mgda-s0"))
    files = report.write_report(root)["files"]
    assert not any("comparison" in path for path in files)
    assert not os.path.exists(os.path.join(out, "comparison.md"))
    assert not os.path.exists(os.path.join(out, "comparison.png"))
    assert "skipping comparison.md" in capsys.readouterr().out


def test_only_plain_finetune_mix_is_the_base(tmp_path):
    root = str(tmp_path)
    write_run(root, "mgda", MGDA, 0, epochs([0.7]))
    write_run(root, "dwa", DWA, 0, epochs([0.7]))
    write_run(root, "weights", dict(SUM, weight_quora=2.0), 0, epochs([0.7]))
    write_run(root, "pcg", PCG, 0, epochs([0.7]))
    groups = results.group_runs(results.find_runs(root))
    assert plots.paired_groups(groups, pcgrad=True, aux=False) == {}
    assert not any(e["is_base"] for e in compare.compare(groups)["methods"])
    write_run(root, "sum", SUM, 0, epochs([0.7]))
    groups = results.group_runs(results.find_runs(root))
    assert list(plots.paired_groups(groups, pcgrad=True, aux=False)) == [
        "finetune-mix (0.3)", "finetune-mix + PCGrad (0.3)"]
    bases = [e["name"] for e in compare.compare(groups)["methods"] if e["is_base"]]
    assert bases == ["finetune-mix (0.3)"]
