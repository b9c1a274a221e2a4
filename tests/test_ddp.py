"""Data parallelism end to end: `torchrun --nproc_per_node 2` (gloo, CPU) runs the real
scripts, and gradient accumulation in one process. With dropout off and fp32,
2 processes x batch b, and 1 process x 2 micro-batches of b, both equal 1 process x batch
2b: the same examples make the same update (sharding.py)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as torch_dist

import multitask_classifier as mtc
from evaluation import read_predictions
from config import BertConfig
from engine.runfiles import LAST_FILE, SUMMARY_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sum: DDP's averaging, and every 3rd step the diagnostics' per-task pass (no DDP sync:
# one all-reduce of the rows) in the same run
METHODS = {"sum": ["--grad_diagnostics_every", "3"], "pcgrad": ["--pcgrad"],
           # sampled steps of 4 global examples over 3 tasks (2 + 1 + 1 at random): a task
           # of one example leaves rank 1 a zero-weight batch (sampled_stream.py); the value
           # is per process, 2/3 of the batch size (2 on 2 processes x 3, 4 on 1 x 6);
           # FAMO reads no Gram matrix: its weights come from the all-reduced losses before
           # one backward through DDP (combiner.LossWeights), the rows on steps 3, 6, ...
           "sampled": ["--grad_diagnostics_every", "3", "--sampling", "temperature",
                       "--sampling_batch_size", lambda batch: str(2 * batch // 3),
                       "--balance", "famo"],
           # stateful: GradVac's seeded order and targets, FAMO's logits from the global losses
           "gradvac-famo": ["--aggregator", "gradvac", "--gradvac_beta", "0.5", "--balance", "famo"]}


@pytest.fixture(scope="module")
def still_checkpoint(tmp_path_factory) -> str:
    """The tiny BERT without dropout: runs that see the same examples must match."""
    from bert import BertModel
    from conftest import SPECIAL, WORDS
    from helpers import to_hf_state_dict, write_checkpoint
    config = BertConfig(vocab_size=len(SPECIAL + WORDS), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("still_bert"), config,
                            to_hf_state_dict(BertModel(config)), vocab=SPECIAL + WORDS)


def args(checkpoint, data, run_dir, batch, *extra):
    return ["--checkpoint", checkpoint, "--data_dir", data, "--run_dir", str(run_dir),
            "--epochs", "2", "--lr", "1e-3", "--hidden_dropout_prob", "0", "--no-progress",
            "--max_length", "64", "--seed", "3", "--save_every_steps", "0", "--subsample", "23",
            *(f"--batch_size_{t}={batch}" for t in ("sst", "quora", "sts")),
            *(e(batch) if callable(e) else e for e in extra)]


# Seen in 3 of ~12 suite runs, never when these tests run alone (0 of 13 tries, 8 of them
# beside a busy process): a gloo rank aborting with this C++ message and no
# Python traceback (CI saw it once on a `--resume` run too). The same command is then started
# again (twice at most): a new run in a clean folder, a resumed run from its last save, as a
# user would; every assertion is still made on that run's outputs. A resumed run that had
# completed before its processes aborted (summary.json written, last.pt removed) is not
# started again (a second --resume would be refused, exit 2, the likely cause of the one
# failure seen on 4 December): its outputs are judged as they are.
GLOO_ABORT = "terminate called without an active exception"


def completed_resume(argv) -> bool:
    if "--resume" not in argv:
        return False
    folder = argv[argv.index("--resume") + 1]
    return (os.path.isfile(os.path.join(folder, SUMMARY_FILE))
            and not os.path.exists(os.path.join(folder, LAST_FILE)))


def torchrun(argv, processes=2, script=("multitask_classifier.py",), **env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", os.path.join(ROOT, script[0]), *script[1:], *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    for _ in range(2):  # at most two more starts, a few seconds apart
        if not (done.returncode and GLOO_ABORT in done.stderr and "KILL_AFTER_SAVES" not in env):
            break
        if completed_resume(argv):  # the abort came at the exit of a finished run
            return subprocess.CompletedProcess(done.args, 0, done.stdout, done.stderr)
        time.sleep(5)
        if "--run_dir" in argv:  # a --resume run continues from its last save, as a user's would
            shutil.rmtree(argv[argv.index("--run_dir") + 1], ignore_errors=True)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    return done


def failure(done) -> str:
    """What a failed torchrun said: its start (the ranks' own lines) and its end."""
    return done.stderr[:2500] + "\n...\n" + done.stderr[-2500:]


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)["model"]


def assert_same_model(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def lines(run_dir, name="metrics.jsonl"):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(still_checkpoint, tiny_data, tmp_path_factory):
    """Per method: 2 processes x batch 3 (torchrun) and 1 process x batch 6."""
    if not (torch_dist.is_available() and torch_dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("ddp")
    found = {}
    for method, extra in METHODS.items():
        two, one = root / f"{method}-2x3", root / f"{method}-1x6"
        done = torchrun(args(still_checkpoint, tiny_data, two, 3, *extra))
        assert done.returncode == 0, failure(done)
        mtc.main(args(still_checkpoint, tiny_data, one, 6, *extra))
        found[method] = (str(two), str(one), done)
    return found


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_on_the_global_batch(runs, method):
    two, one, _ = runs[method]
    assert_same_model(two, one)
    for a, b in zip(lines(two), lines(one)):
        assert a["epoch"] == b["epoch"]
        for task, loss in a["train_loss"].items():
            assert loss == pytest.approx(b["train_loss"][task], rel=1e-5)
        for task, score in a["dev"].items():  # sharded, gathered evaluation = one process's
            assert score == pytest.approx(b["dev"][task], abs=1e-6)
    if method == "pcgrad":  # every process combined the same all-reduced gradients
        for pair, stats in lines(one)[0]["grad"].items():
            assert lines(two)[0]["grad"][pair]["conflict"] == stats["conflict"]
            assert lines(two)[0]["grad"][pair]["cos"] == pytest.approx(stats["cos"], abs=2e-4)


@pytest.mark.parametrize("method", METHODS)
def test_only_rank_zero_writes_one_run_folder(runs, method):
    two, one, done = runs[method]
    with open(os.path.join(two, "config.json")) as f:
        assert json.load(f)["world_size"] == 2
    assert len(lines(two)) == 2 and os.path.isfile(os.path.join(two, "summary.json"))
    assert not os.path.exists(os.path.join(two, "last.pt"))
    assert done.stdout.count("epoch 1:") == 1  # one process logs
    assert "x 2 processes" in done.stdout and "batch 3 x 2 processes = 6" in done.stdout
    for name in sorted(os.listdir(os.path.join(one, "predictions"))):
        found, want = (read_predictions(os.path.join(d, "predictions", name)) for d in (two, one))
        assert list(found) == list(want)  # every example once, in file order
        assert [float(v) for v in found.values()] == pytest.approx([float(v) for v in want.values()], abs=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_equals_the_larger_batch(still_checkpoint, tiny_data, tmp_path, method):
    """2 micro-batches of 3, then one step = one batch of 6 (each epoch's last batch is
    short: the micro-batches' losses are weighted by their shares)."""
    extra = METHODS[method]
    micro = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "micro", 3,
                          "--grad_accumulation", "2", *extra))
    whole = mtc.main(args(still_checkpoint, tiny_data, tmp_path / "whole", 6, *extra))
    assert_same_model(micro, whole)
    for a, b in zip(lines(micro), lines(whole)):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.slow  # ~20 s of CPU more than an eager torchrun: each rank traces the step
def test_compiled_two_processes_equal_one(runs, still_checkpoint, tiny_data, tmp_path):
    """--compile under torchrun: each rank's TaskLosses compiled in place and DDP around it
    (torch's recommended order). With Dynamo's eager backend (torch's own kernels) and no
    diagnostics steps the update is an eager torchrun's bit for bit; with the diagnostics'
    per-task passes (compiled too, no DDP sync; an eager run takes one packed pass, which sums
    in another order) it is one process's on the global batch up to float rounding."""
    two, eager = tmp_path / "two", tmp_path / "eager"
    plain = [*METHODS["sum"], "--no-grad_diagnostics"]
    for folder, more in ((two, ["--compile"]), (eager, [])):
        done = torchrun(args(still_checkpoint, tiny_data, folder, 3, *plain, *more),
                        MINBERT_COMPILE_BACKEND="eager")
        assert done.returncode == 0, failure(done)
    assert_same_model(str(two), str(eager), atol=0)
    diagnosed = tmp_path / "diagnosed"
    done = torchrun(args(still_checkpoint, tiny_data, diagnosed, 3, *METHODS["sum"], "--compile"),
                    MINBERT_COMPILE_BACKEND="eager")
    assert done.returncode == 0, failure(done)
    assert_same_model(str(diagnosed), runs["sum"][1])


def test_resume_needs_the_same_number_of_processes(runs, still_checkpoint, tiny_data, tmp_path):
    """A run saved by 2 processes does not continue on 1 (its global batch would change)."""
    from engine.distributed import Dist
    from engine.errors import UserError
    from engine.trainer_state import load_state, save_state
    cpu = torch.device("cpu")
    save_state(str(tmp_path / "last.pt"), {"model": {}, "optimizers": {}, "progress": {}},
               Dist(0, 2, 0, cpu), {})
    with pytest.raises(UserError, match="saved by 2 process"):
        load_state(str(tmp_path / "last.pt"), Dist(0, 1, 0, cpu))


def test_killed_torchrun_run_resumes_exactly(runs, still_checkpoint, tiny_data, tmp_path):
    """Both processes die (SIGKILL) right after the epoch-1 save; `torchrun ... --resume`
    continues on 2 processes and ends where the uninterrupted run ended."""
    run_dir = tmp_path / "run"
    killed = torchrun(args(still_checkpoint, tiny_data, run_dir, 3, "--pcgrad"),
                      script=("tests/die_after_save.py", "multitask"), KILL_AFTER_SAVES="1")
    assert killed.returncode != 0 and os.path.isfile(run_dir / "last.pt")
    assert not os.path.exists(run_dir / "summary.json")
    done = torchrun(["--resume", str(run_dir), "--no-progress"])
    assert done.returncode == 0, failure(done)
    reference, _, _ = runs["pcgrad"]
    assert_same_model(str(run_dir), reference, atol=0)
    assert lines(str(run_dir)) == [dict(r, seconds=a["seconds"]) for r, a in
                                   zip(lines(reference), lines(str(run_dir)))]
