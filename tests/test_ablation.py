"""report.py --ablation_base: named rows (folders <row>-seed<N>) against a base row, paired by seed."""
import json
import os

import pytest

import report
from analysis.ablation import ablation, leaderboard_overall
from analysis.results import find_runs
from engine.cli import run_cli
from test_report import MIX, write_run


@pytest.fixture
def rows(tmp_path):
    root = str(tmp_path / "screens")
    # base: seeds 0, 1, 2; cross: seeds 0, 1 (+0.02 and +0.04 STS at the best epoch);
    # other: one seed only; lone-folder: not a <row>-seed<N> name, left out
    write_run(root, "base-seed0", MIX, 0, [(0.40, 0.80, 0.80, 0.6667)])
    write_run(root, "base-seed1", MIX, 1, [(0.42, 0.82, 0.80, 0.68), (0.30, 0.70, 0.70, 0.5667)])
    write_run(root, "base-seed2", MIX, 2, [(0.44, 0.84, 0.84, 0.7067)])
    write_run(root, "sts-cross-seed0", MIX, 0, [(0.40, 0.80, 0.82, 0.6733)])
    write_run(root, "sts-cross-seed1", MIX, 1, [(0.42, 0.82, 0.84, 0.6933)])
    write_run(root, "other-seed0", MIX, 0, [(0.41, 0.80, 0.80, 0.67)])
    write_run(root, "unfinished-seed0", MIX, 0, [(0.9, 0.9, 0.9, 0.9)], complete=False)
    write_run(root, "lone-folder", MIX, 0, [(0.9, 0.9, 0.9, 0.9)])
    return root


def test_leaderboard_overall_maps_pearson_to_unit_interval():
    assert leaderboard_overall({"sst": 0.5, "quora": 0.8, "sts": 0.6}) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert leaderboard_overall({"sst": 0.5, "quora": 0.8}) is None


def test_rows_are_paired_by_seed_against_the_base(rows):
    result = ablation(find_runs(rows), "base")
    by_name = {e["name"]: e for e in result["rows"]}
    assert [e["name"] for e in result["rows"]] == ["base", "other", "sts-cross"]
    assert by_name["base"]["seeds"] == [0, 1, 2]
    assert by_name["base"]["mean"]["sts"] == pytest.approx((0.80 + 0.80 + 0.84) / 3)
    sts = by_name["sts-cross"]["diff"]["sts"]
    assert sts["seeds"] == [0, 1] and sts["diffs"] == pytest.approx([0.02, 0.04])
    assert sts["mean"] == pytest.approx(0.03) and sts["ci"] is not None
    lead = by_name["sts-cross"]["diff"]["leaderboard"]
    assert lead["mean"] == pytest.approx(0.03 / 2 / 3)
    assert by_name["other"]["diff"]["sst"]["n"] == 1 and by_name["other"]["diff"]["sst"]["ci"] is None
    assert "unfinished" not in by_name and "lone-folder" not in by_name


def test_report_writes_ablation_files_and_refuses_an_unknown_base(rows, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    report.main([rows, "--out", out, "--ablation_base", "base"])
    text = open(os.path.join(out, "ablation.md")).read()
    assert "| sts-cross | 2 |" in text and "+0.030 [" in text and "'base'" in text
    assert json.load(open(os.path.join(out, "ablation.json")))["base"] == "base"
    monkeypatch.setattr("sys.argv", ["report.py", rows, "--out", str(tmp_path / "o2"),
                                     "--ablation_base", "nope"])
    assert run_cli(report.main) == 2
    err = capsys.readouterr().err
    assert "--ablation_base nope" in err and "base, other, sts-cross" in err
    assert not os.path.exists(tmp_path / "o2")  # refused before anything was written
