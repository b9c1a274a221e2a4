"""--ema: the moving average of the trainable weights (engine/ema.py), evaluated beside the
live weights each epoch, the better one kept as best.pt. (Its exact resume is a case of
tests/test_resume.py.)"""
import json
import os

import pytest
import torch
from torch import nn

import multitask_classifier as mtc
from engine.ema import EMA
from engine.errors import ConfigError
from evaluation import read_predictions

from test_training import epochs, run_args


def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen: no shadow
    return model


def test_update_is_the_warmed_up_average_of_the_trainable_weights():
    model = tiny_model()
    ema = EMA(model, 0.95)
    assert ema.names == ["0.weight", "1.weight", "1.bias"]
    expected = [p.detach().clone() for p in ema.params]
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.95, (1 + n) / (10 + n))  # 0.1 at the first update, then 0.95 from n = 170
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, ema.params)]
        ema.update()
    assert ema.updates == 30
    for shadow, e in zip(ema.shadow, expected):
        torch.testing.assert_close(shadow, e, rtol=1e-6, atol=1e-6)
    frozen = model[0].bias.detach().clone()
    with torch.no_grad():
        model[0].bias.add_(1.0)
    ema.update()
    assert torch.equal(model[0].bias, frozen + 1.0)  # untouched by the average


def test_applied_swaps_in_the_average_and_restores_the_weights_exactly():
    model = tiny_model()
    ema = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = [s.clone() for s in ema.shadow]
    with ema.applied():
        for p, s in zip(ema.params, shadow):
            assert torch.equal(p, s)
        assert torch.equal(model[0].bias, live["0.bias"])  # frozen: the live value
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, shadow))


def test_state_dict_round_trip():
    model = tiny_model()
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update()
    ema.update()
    other = EMA(tiny_model(), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 2 and other.current_decay() == ema.current_decay()
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_decay_outside_0_1_is_refused(tiny_checkpoint, tiny_data, tmp_path, value):
    with pytest.raises(ConfigError, match="--ema must be a finite number in"):
        mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--ema", value))


def test_a_run_keeps_the_better_of_the_live_and_averaged_weights(tiny_checkpoint, tiny_data,
                                                                 tmp_path):
    # Whichever of the live and averaged weights scored higher in the best epoch is best.pt
    # (the trajectory itself depends on float rounding, so the winner is read, not assumed).
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "3",
                                "--ema", "0.9"))
    records = epochs(run_dir)
    assert all(set(r["dev_ema"]) == {"sst", "quora", "sts"} for r in records)
    assert any(r["overall_ema"] != r["overall"] for r in records)  # two sets of weights
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    best = max(records, key=lambda r: max(r["overall"], r["overall_ema"]))
    kind = "ema" if best["overall_ema"] > best["overall"] else "live"
    dev, score = ((best["dev_ema"], best["overall_ema"]) if kind == "ema"
                  else (best["dev"], best["overall"]))
    assert summary["best_epoch"] == best["epoch"] and summary["weights"] == kind
    assert summary["best"] == {**dev, "overall": score}
    saved = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)
    assert saved["weights"] == kind and saved["overall"] == score
    # best.pt holds the chosen weights: evaluated again, it scores what they scored
    eval_dir = mtc.main(["--eval_only", "--load", os.path.join(run_dir, "best.pt"),
                         "--data_dir", tiny_data, "--run_dir", str(tmp_path / "eval")])
    for name in os.listdir(os.path.join(run_dir, "predictions")):
        assert read_predictions(os.path.join(eval_dir, "predictions", name)) == \
            read_predictions(os.path.join(run_dir, "predictions", name)), name


def test_off_by_default(tiny_checkpoint, tiny_data, tmp_path):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1"))
    assert "dev_ema" not in epochs(run_dir)[0]
    assert "weights" not in json.load(open(os.path.join(run_dir, "summary.json")))
    assert "weights" not in torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)
