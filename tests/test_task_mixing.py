"""--sampling temperature / annealed (engine/task_mixing.py, engine/sampled_stream.py): the
per-step task counts follow p_k, every task is in every step, the annealed exponent
follows Stickland & Murray's schedule, the streams resume and shard exactly, and tiny
runs of each mode finish. Resume and 2-process equality: test_resume.py, test_ddp.py."""
import json
import math
import os

import pytest

import multitask_classifier as mtc
from engine.configs import MultitaskConfig
from engine.errors import ConfigError
from engine.sampled_stream import SampledStream, ZeroWeightBatch
from engine.sharding import micro_scale
from engine.task_mixing import (TaskMixer, annealed_alpha, parse_temperature, probabilities,
                                step_counts)

from test_training import run_args

SIZES = [8544, 16000, 6040]  # SST, the Quora re-split, STS


def test_temperature_one_is_proportional_and_inf_uniform():
    one = TaskMixer(SIZES, 30, "temperature", 1.0, 3, 0).probabilities(1)
    assert one == pytest.approx([n / sum(SIZES) for n in SIZES], rel=1e-12)
    uniform = TaskMixer(SIZES, 30, "temperature", parse_temperature("inf"), 3, 0).probabilities(2)
    assert uniform == pytest.approx([1 / 3] * 3, rel=1e-12)
    root = [math.sqrt(n) for n in SIZES]  # T = 2: square-root sampling
    assert probabilities(SIZES, 0.5) == pytest.approx([r / sum(root) for r in root], rel=1e-12)


def test_annealed_alpha_follows_the_schedule():
    """alpha = 1 - 0.8 (e - 1) / (E - 1): 1 in the first epoch, 0.2 in the last."""
    assert [annealed_alpha(e, 5) for e in range(1, 6)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert annealed_alpha(1, 1) == 1.0
    mixer = TaskMixer(SIZES, 30, "annealed", 2.0, 3, 0)  # the temperature is not used
    for epoch, alpha in ((1, 1.0), (2, 0.6), (3, 0.2)):
        weights = [n ** alpha for n in SIZES]
        assert mixer.probabilities(epoch) == pytest.approx([w / sum(weights) for w in weights])
        steps = range(1000 * epoch, 1000 * epoch + 400)
        seen = [sum(c) for c in zip(*(mixer.plan(s, epoch) for s in steps))]
        assert [s / (400 * 30) for s in seen] == pytest.approx(mixer.probabilities(epoch), abs=0.01)


@pytest.mark.parametrize("sizes, total, temperature", [
    (SIZES, 30, 2.0),
    ([26, 26, 28], 32, 1.0),  # shares 10.4 / 10.4 / 11.2: a fixed rounding would bias them
    ([5, 1, 1], 9, 1.0)])
def test_the_counts_follow_p_over_many_steps(sizes, total, temperature):
    """Over 4,000 seeded steps each task's share is p_k to within 6 standard deviations of
    the rounding's draws (at most 0.5 / sqrt(steps) each), and no step's count is more than
    one from total x p_k."""
    mixer, steps = TaskMixer(sizes, total, "temperature", temperature, 1, 7), 4000
    p = mixer.probabilities(1)
    counts = [mixer.plan(step, 1) for step in range(steps)]
    assert all(sum(c) == total for c in counts)
    for k, share in enumerate(p):
        assert all(abs(c[k] - total * share) < 1 for c in counts)
        seen = sum(c[k] for c in counts)
        assert abs(seen - steps * total * share) <= 6 * 0.5 * math.sqrt(steps)
    assert len({tuple(c) for c in counts}) > 1  # random, not a fixed rounding


def test_every_task_gets_an_example_every_step():
    """Shares 3.96 / 0.04 / 0.004 of 4: the small tasks still get one each."""
    for step in range(300):
        assert step_counts(4, probabilities([1000, 10, 1], 1.0), 0, step) == [2, 1, 1]
    assert all(min(step_counts(5, [0.9, 0.05, 0.05], s, 0)) >= 1 for s in range(300))


def test_the_counts_are_a_function_of_seed_and_step():
    p = probabilities(SIZES, 0.5)
    assert [step_counts(10, p, 3, s) for s in range(50)] == [step_counts(10, p, 3, s) for s in range(50)]
    assert [step_counts(10, p, 3, s) for s in range(50)] != [step_counts(10, p, 4, s) for s in range(50)]


class Collate:
    """Examples -> their ids (a stand-in for datasets.Collator)."""
    def __call__(self, examples):
        import torch
        from datasets import Batch
        return Batch(list(examples), torch.zeros(len(examples)), None)

    def lengths(self, examples):
        return [len(e) for e in examples]


def stream(mixer, bucket=False, rank=0, world=1, micro=1, n=10):
    examples = [f"e{i}" + "x" * (i % 4) for i in range(n)]
    return SampledStream(0, mixer, examples, Collate(), bucket, 5, 4, micro, rank, world)


@pytest.mark.parametrize("bucket", [False, True])
def test_a_stream_takes_each_example_once_a_pass_and_resumes(bucket):
    mixer = TaskMixer([10], 3, "temperature", 1.0, 1, 0)
    mixer.counts = [3]
    s = stream(mixer, bucket)
    taken = [i for _ in range(10) for b in s.next_step()[0] for i in b.ids]  # 30: 3 passes
    for p in range(3):
        assert sorted(taken[10 * p:10 * p + 10]) == sorted(s.examples)
    assert taken[:10] != taken[10:20]  # each pass its own order
    again = stream(mixer, bucket)
    for _ in range(4):
        again.next_step()
    resumed = stream(mixer, bucket)
    resumed.load_state_dict(again.state_dict())
    assert [b.ids for _ in range(6) for b in resumed.next_step()[0]] == \
        [taken[i:i + 3] for i in range(12, 30, 3)]


def test_ranks_take_contiguous_parts_and_an_empty_part_weighs_nothing():
    """Two processes with two micro-batches each take what one process takes; a count of
    one leaves rank 1 a ZeroWeightBatch, whose loss factor is 0."""
    mixer = TaskMixer([10], 3, "temperature", 1.0, 1, 0)
    mixer.counts = [5]
    one = [i for b in stream(mixer).next_step()[0] for i in b.ids]
    parts = [stream(mixer, rank=r, world=2, micro=2).next_step() for r in (0, 1)]
    assert [len(micro) for micro, _ in parts] == [2, 2] and all(size == 5 for _, size in parts)
    assert [i for micro, _ in parts for b in micro for i in b.ids] == one
    mixer.counts = [1]
    (first, _), (second, _) = [stream(mixer, rank=r, world=2).next_step() for r in (0, 1)]
    assert first[0].ids == one[:1] and isinstance(second[0], ZeroWeightBatch)
    assert micro_scale(len(second[0].to("cpu")), 1, 2) == 0.0  # still zero after .to()
    assert micro_scale(len(first[0]), 1, 2) == 2.0  # the mean over the 2 processes: 1


@pytest.mark.parametrize("flags, message", [
    (["--mode", "seq", "--sampling", "temperature"], "--sampling temperature needs --mode mix"),
    (["--sampling_temperature", "0"], "--sampling_temperature must be a positive number or inf"),
    (["--sampling_temperature", "nan"], "--sampling_temperature must be"),
])
def test_bad_sampling_options_are_refused(flags, message):
    from engine.cli import parse_config
    with pytest.raises(ConfigError, match=message):
        parse_config(MultitaskConfig, flags)


def test_a_step_too_small_for_the_tasks_is_refused_before_the_run_folder(tiny_checkpoint, tiny_data,
                                                                         tmp_path):
    """Per process and micro-batch: 1 x 2 micro-batches cannot hold 3 tasks; 2 x 2 can."""
    argv = run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--sampling", "annealed",
                    "--sampling_batch_size", "1", "--grad_accumulation", "2")
    with pytest.raises(ConfigError, match="--sampling_batch_size 1 x 2 .* give at least 2"):
        mtc.main(argv)
    assert not os.path.exists(tmp_path / "run")


def test_a_config_without_the_sampling_fields_reads_as_cycle():
    saved = {k: v for k, v in MultitaskConfig().as_dict().items() if not k.startswith("sampling")}
    assert MultitaskConfig.from_saved(saved).sampling == "cycle"


@pytest.mark.parametrize("flags", [
    ["--sampling", "temperature", "--sampling_temperature", "1"],
    ["--sampling", "temperature", "--sampling_temperature", "inf", "--no-bucket",
     "--grad_accumulation", "2"],
    ["--sampling", "annealed", "--sampling_batch_size", "5"],
], ids=["T1", "Tinf-nobucket-accumulation", "annealed"])
def test_sampled_runs_with_pcgrad_finish(tiny_checkpoint, tiny_data, tmp_path, flags, capsys):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "2",
                                "--pcgrad", "--log_every_steps", "1", *flags))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    total = 5 if "5" in flags else 12 * (2 if "--grad_accumulation" in flags else 1)
    assert len(steps) == 2 * math.ceil(72 / total)  # 3 tasks of 24 examples
    assert all(set(s["loss"]) == {"sst", "quora", "sts"} for s in steps)  # every task, every step
    assert f"{total} examples a step" in capsys.readouterr().out


def test_a_sampled_run_is_its_own_report_row():
    """report.py averages the runs of one configuration name: a sampled mix is not the
    plain (cycle) mix."""
    from analysis.results import config_name, config_slug
    base = MultitaskConfig().as_dict()
    names = {config_name(base), config_name({**base, "sampling": "annealed"}),
             config_name({**base, "sampling": "temperature", "sampling_temperature": "inf"})}
    assert len(names) == 3 and config_name(base) == "finetune-mix (0.3)"
    assert config_slug({**base, "sampling": "temperature"}) == "finetune-mix-t-2-sampling-0.3"


def test_a_subsample_fraction_keeps_the_tasks_relative_sizes():
    """--subsample caps every task at one size (uniform shares for any --sampling exponent);
    a fraction keeps the full data's proportions: SST 8,544, Quora 15,999, STS 6,040."""
    from datasets import subsample_limit
    assert [subsample_limit(n, 0, 0.25) for n in (8544, 15999, 6040)] == [2136, 4000, 1510]
    assert [subsample_limit(n, 2000, 0.0) for n in (8544, 15999, 6040)] == [2000] * 3
    assert subsample_limit(3, 0, 0.01) == 1 and subsample_limit(3, 0, 0.0) == 0  # 0: all


def test_a_run_trains_on_its_fraction_and_says_so(tiny_checkpoint, tiny_data, tmp_path, capsys):
    run_dir = mtc.main(run_args(tiny_checkpoint, tiny_data, tmp_path / "run", "--epochs", "1",
                                "--subsample_fraction", "0.5", "--sampling", "temperature",
                                "--sampling_batch_size", "6"))
    out = capsys.readouterr().out
    for task in ("sst", "quora", "sts"):  # 24 examples each in the tiny data
        assert f"{task}: 12 train" in out
    assert "6 examples a step, 6 steps an epoch" in out  # 36 examples
    assert "training fraction 0.5)" in out and os.path.isdir(run_dir)


@pytest.mark.parametrize("flags, message", [
    (["--subsample_fraction", "1"], r"--subsample_fraction must be a finite number in \[0, 1\)"),
    (["--subsample_fraction", "-0.1"], "--subsample_fraction must be"),
    (["--subsample_fraction", "0.5", "--subsample", "100"], "give one"),
])
def test_bad_subsample_fractions_are_refused(flags, message):
    from engine.cli import parse_config
    with pytest.raises(ConfigError, match=message):
        parse_config(MultitaskConfig, flags)
