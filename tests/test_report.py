import json
import math
import os

import pytest

from analysis import plots
import report
from analysis import results
from engine import runfiles
from engine.cli import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIX = {"option": "finetune", "mode": "mix", "pcgrad": False, "aux": "",
       "hidden_dropout_prob": 0.3, "epochs": 3}
PCGRAD = dict(MIX, pcgrad=True)


def write_run(root, folder, cfg, seed, epochs, complete=True, grad=None, grad_norm=None):
    """A run folder as multitask_classifier.py writes it; `epochs` holds (sst, quora, sts,
    overall) per epoch."""
    path = os.path.join(root, folder)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg, seed=seed), f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, (sst, quora, sts, overall) in enumerate(epochs, 1):
            record = {"epoch": i, "train_loss": {"sst": 1.0, "quora": 0.5, "sts": 1.0},
                      "dev": {"sst": sst, "quora": quora, "sts": sts}, "overall": overall,
                      "grad": grad or {}, "seconds": 10.0}
            if grad_norm:
                record["grad_norm"] = grad_norm
            f.write(json.dumps(record) + "\n")
    if complete:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"epochs": len(epochs)}, f)
    return path


GRAD = {"sst/quora": {"cos": 0.1, "conflict": 0.4}, "sst/sts": {"cos": -0.05, "conflict": 0.6},
        "quora/sts": {"cos": 0.2, "conflict": 0.3}}


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path / "runs")
    # epoch 2 is best by overall although epoch 3 has the best SST: the table must use epoch 2
    write_run(root, "mix-s0", MIX, 0, [(0.40, 0.80, 0.80, 0.66), (0.50, 0.84, 0.86, 0.70),
                                       (0.55, 0.81, 0.70, 0.65)])
    write_run(root, "mix-s1", MIX, 1, [(0.46, 0.86, 0.88, 0.72), (0.44, 0.85, 0.80, 0.69)])
    write_run(root, "sub/pcgrad-s0", PCGRAD, 0, [(0.47, 0.83, 0.85, 0.71)], grad=GRAD,
              grad_norm={"sst": 7.4, "quora": 4.0, "sts": 15.3})
    write_run(root, "sub/pcgrad-s1", PCGRAD, 1, [(0.30, 0.70, 0.60, 0.55), (0.35, 0.75, 0.65, 0.60)],
              complete=False, grad=GRAD)
    return root


def rows_by_name(rows):
    return {row["name"]: row for row in rows}


def test_config_names_and_slugs():
    cases = [({"option": "pretrain", "mode": "mix", "hidden_dropout_prob": 0.3},
              "pretrain (dropout 0.3)", "pretrain-0.3"),
             (dict(MIX, mode="seq"), "finetune-seq (0.3)", "finetune-seq-0.3"),
             (dict(MIX, hidden_dropout_prob=0.5), "finetune-mix (0.5)", "finetune-mix-0.5"),
             (PCGRAD, "finetune-mix + PCGrad (0.3)", "finetune-mix-pcgrad-0.3"),
             (dict(MIX, aux="data/yelp-aux-train.csv"), "finetune-mix + aux (0.3)",
              "finetune-mix-aux-0.3"),
             (dict(MIX, tasks="quora,sts"), "finetune-mix + quora+sts only (0.3)",
              "finetune-mix-quora-sts-only-0.3"),
             (dict(PCGRAD, freeze_word_embeddings=True), "finetune-mix + PCGrad + frozen word emb. (0.3)",
              "finetune-mix-pcgrad-frozen-word-emb-0.3")]
    for cfg, name, slug in cases:
        assert results.config_name(cfg) == name
        assert results.config_slug(cfg) == slug


def test_best_epoch_is_chosen_by_overall(runs):
    run = results.load_run(os.path.join(runs, "mix-s0"))
    assert run.complete and run.best()["epoch"] == 2


def test_table_mean_std_and_incomplete(runs, tmp_path):
    out = str(tmp_path / "out")
    result = report.write_report(runs, out)
    with open(os.path.join(out, "table.json")) as f:
        rows = rows_by_name(json.load(f)["rows"])
    assert list(rows) == ["finetune-mix (0.3)", "finetune-mix + PCGrad (0.3)",
                          "finetune-mix + PCGrad (0.3) (incomplete)"]
    mix = rows["finetune-mix (0.3)"]
    assert mix["best_epochs"] == [2, 1] and mix["seeds"] == [0, 1]
    assert mix["mean"]["sst"] == pytest.approx(0.48)
    assert mix["std"]["sst"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))  # sample std
    assert mix["mean"]["overall"] == pytest.approx(0.71)
    assert mix["mean"]["sts"] == pytest.approx(0.87)
    single = rows["finetune-mix + PCGrad (0.3)"]
    assert single["mean"]["quora"] == pytest.approx(0.83) and single["std"]["quora"] is None
    partial = rows["finetune-mix + PCGrad (0.3) (incomplete)"]
    assert not partial["complete"] and partial["best_epochs"] == [2]
    assert partial["mean"]["overall"] == pytest.approx(0.60)

    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    assert table == result["table_md"]
    assert "| Method | SST acc | Quora acc | STS corr | Overall |" in table
    assert "| finetune-mix (0.3) | 0.480 ± 0.028 | 0.850 ± 0.014 | 0.870 ± 0.014 | 0.710 ± 0.014 |" in table
    assert "| finetune-mix + PCGrad (0.3) | 0.470 | 0.830 | 0.850 | 0.710 |" in table
    assert "| finetune-mix + PCGrad (0.3) (incomplete) | 0.350 | 0.750 | 0.650 | 0.600 |" in table


def test_plots_are_pngs_and_missing_ones_are_skipped(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    files = report.write_report(runs, out)["files"]
    for name in ("methods.png", "pcgrad.png", "conflicts.png", "grad_norms.png"):
        path = os.path.join(out, name)
        assert path in files
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    assert not os.path.exists(os.path.join(out, "aux.png"))
    assert "skipping aux.png" in capsys.readouterr().out


def test_conflicts_skipped_without_grad(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "mix-s0", MIX, 0, [(0.4, 0.8, 0.8, 0.66)], complete=False)
    report.main([root])
    printed = capsys.readouterr().out
    assert "skipping conflicts.png" in printed and "skipping pcgrad.png" in printed
    assert "skipping grad_norms.png" in printed
    assert "| finetune-mix (0.3) (incomplete) | 0.400 |" in printed
    assert os.path.isfile(os.path.join(root, "report", "methods.png"))


def test_a_corrupt_metrics_line_is_an_error_naming_file_and_line(tmp_path, capsys, monkeypatch):
    """Writes are atomic, so a line that does not parse is corruption, never skipped."""
    root = str(tmp_path)
    path = write_run(root, "mix-s0", MIX, 0, [(0.4, 0.8, 0.8, 0.66)], complete=False)
    with open(os.path.join(path, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "dev": {"sst"\n')
    with pytest.raises(runfiles.ResultsError, match=r"mix-s0/metrics.jsonl, line 2: not valid JSON"):
        report.main([root])
    monkeypatch.setattr("sys.argv", ["report.py", root])
    assert run_cli(report.main) == 2
    assert "metrics.jsonl, line 2" in capsys.readouterr().err


def test_a_task_subset_is_never_the_mix_baseline_and_order_does_not_matter(tmp_path):
    root = str(tmp_path)
    write_run(root, "quora-only", dict(MIX, tasks="quora"), 0, [(0.4, 0.8, 0.8, 0.66)])
    write_run(root, "pcg", PCGRAD, 0, [(0.4, 0.8, 0.8, 0.66)])
    groups = results.group_runs(results.find_runs(root))
    assert plots.paired_groups(groups, pcgrad=True, aux=False) == {}
    write_run(root, "reordered", dict(MIX, tasks="sts,quora,sst"), 0, [(0.4, 0.8, 0.8, 0.66)])
    groups = results.group_runs(results.find_runs(root))
    assert list(plots.paired_groups(groups, pcgrad=True, aux=False)) == [
        "finetune-mix (0.3)", "finetune-mix + PCGrad (0.3)"]
    assert results.config_name(dict(MIX, tasks="sts,quora")) == \
        results.config_name(dict(MIX, tasks="quora,sts")) == "finetune-mix + quora+sts only (0.3)"


def test_paired_groups_need_same_dropout(runs, tmp_path):
    root = str(tmp_path / "r")
    write_run(root, "mix05", dict(MIX, hidden_dropout_prob=0.5), 0, [(0.4, 0.8, 0.8, 0.66)])
    write_run(root, "pcg03", PCGRAD, 0, [(0.4, 0.8, 0.8, 0.66)])
    groups = results.group_runs(results.find_runs(root))
    assert plots.paired_groups(groups, pcgrad=True, aux=False) == {}
    full = results.group_runs(results.find_runs(runs))
    assert list(plots.paired_groups(full, pcgrad=True, aux=False)) == [
        "finetune-mix (0.3)", "finetune-mix + PCGrad (0.3)"]


def test_runs_of_one_row_with_other_settings_get_a_note(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "a", dict(MIX, lr=5e-5), 0, [(0.4, 0.8, 0.8, 0.66)])
    write_run(root, "b", dict(MIX, lr=1e-5), 1, [(0.4, 0.8, 0.8, 0.66)])
    report.write_report(root)
    printed = capsys.readouterr().out
    assert "finetune-mix (0.3) mixes runs with different lr" in printed
    assert "different seed" not in printed
