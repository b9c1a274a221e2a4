"""Predict with a trained run: one sentence per line (two TAB-separated sentences for the
pair tasks quora and sts) in, one line per input out:

    prediction <TAB> detail <TAB> input

The prediction is a label index (sst, cfimdb, quora) or the 0-5 similarity score (sts);
the detail is the label's name (sst, cfimdb), the paraphrase probability (quora) or the
raw, unclamped score (sts). The checkpoint's own config decides everything else (pair
encodings, max_length, pooling); no data folder is read. Several --load checkpoints predict
as one ensemble: each through its own model, their probabilities (or scores) averaged.

    echo "a gripping , funny film ." | python predict.py --load runs/<run>/best.pt --task sst
    python predict.py --load runs/<run>/best.pt --task quora --input pairs.tsv --output out.tsv
    python predict.py --load runs/a/best.pt --load runs/b/best.pt --task sts --input pairs.tsv
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

import classifier
import multitask_classifier
from engine import run
from engine import ensemble
from engine.cli import check_ranges, parse_config, repeated, run_cli
from datasets import Example, make_loader
from engine.errors import CheckpointError, ConfigError, DataError
from engine.paths import check_kind
from evaluation import format_prediction
from engine.runfiles import STDIN, atomic_write, check_output, check_output_file, read_lines
from engine.specs import SPECS
from engine.tasks import KINDS, Task, average
from utils import choose_device

# the "script" a best.pt names -> its config class and task builder
SCRIPTS = {multitask_classifier.SCRIPT: (multitask_classifier.MultitaskConfig,
                                         multitask_classifier.build_tasks),
           classifier.SCRIPT: (classifier.ClassifierConfig, classifier.build_tasks)}


@dataclass
class PredictConfig:
    load: str = field(default="", metadata={
        "help": "a run's best.pt; several (the flag repeated, or a comma-separated list): an "
                "ensemble, their probabilities or scores averaged", "repeatable": True})
    task: str = field(default="sst", metadata={"help": "the head to predict with",
                                               "choices": list(SPECS)})
    input: str = field(default="", metadata={"help": "input file (default: stdin)"})
    output: str = field(default="", metadata={"help": "output file (default: stdout)"})
    batch_size: int = 32
    use_gpu: bool = field(default=False, metadata={"help": "use CUDA when present"})
    precision: str = field(default="fp32", metadata={
        "help": "bf16: bfloat16 autocast; auto: bf16 where the hardware computes it natively",
        "choices": ["fp32", "bf16", "auto"]})

    INT_RANGES: ClassVar[dict] = {"batch_size": (1, None)}

    def __post_init__(self) -> None:
        if not self.load:
            raise ConfigError("--load CHECKPOINT is required")
        repeated("load", self.load)
        check_ranges(self)
        check_kind("--input", self.input, "file")


def load_trained(path: str, device: torch.device, precision: str = "fp32", checkpoint: str = ""
                 ) -> tuple[dict, run.RunConfig, torch.nn.Module, list[Task]]:
    """A best.pt of either script, rebuilt through the run path: the saved checkpoint, its
    config, the model it was trained as (weights loaded strictly) and its tasks (no data read).
    `checkpoint`: the folder of its vocabulary, when not the run's own --checkpoint."""
    saved = run.load_saved(path)
    config_cls, make_tasks = SCRIPTS[run.saved_script(saved)]
    changes = {"checkpoint": checkpoint} if checkpoint else {}
    cfg = config_cls.from_saved(saved["config"], data_dir="", eval_only=False, load="",
                                use_gpu=device.type == "cuda", precision=precision, **changes)
    model, tasks = run.rebuild(saved, cfg, make_tasks, (), device, path)
    return saved, cfg, model, tasks


def load_model(path: str, task_name: str, device: torch.device,
               precision: str = "fp32") -> tuple[torch.nn.Module, Task]:
    """The model a best.pt was trained as (of either script) and its `task_name` task."""
    _, _, model, tasks = load_trained(path, device, precision)
    found = {t.name: t for t in tasks}
    if task_name not in found:
        raise CheckpointError(f"{path} has no {task_name} head; it has {', '.join(found)}")
    return model, found[task_name]


def parse_rows(lines: Sequence[str], pair: bool, source: str) -> list[tuple[str, ...]]:
    """Each line's sentences (one, or two TAB-separated for a pair task)."""
    rows = []
    for number, line in enumerate(lines, 1):
        texts = tuple(line.split("\t"))
        wanted = 2 if pair else 1
        if not any(t.strip() for t in texts):
            raise DataError(f"{source}, line {number}: empty line")
        if len(texts) != wanted or not all(t.strip() for t in texts):
            what = "two TAB-separated sentences" if pair else "one sentence (no TAB)"
            raise DataError(f"{source}, line {number}: expected {what}, got {len(texts)} "
                            f"field(s){'' if all(t.strip() for t in texts) else ', one empty'}")
        rows.append(texts)
    if not rows:
        raise DataError(f"{source}: no input lines")
    return rows


@torch.inference_mode()
def texts_outputs(model: torch.nn.Module, task: Task, rows: Sequence[tuple[str, ...]],
                  device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """The task's output for each row, in order (tasks.Task.output: what predictions are
    made from, and what an ensemble averages)."""
    model.eval()
    examples = [Example(str(i), tuple(t.strip() for t in texts)) for i, texts in enumerate(rows)]
    return torch.cat([task.output(model(task.name, batch.to(device))).cpu()
                      for batch in make_loader(examples, task.collate, batch_size, shuffle=False)])


def decide(task: Task, output: torch.Tensor) -> list[tuple]:
    """(prediction, detail) per row of outputs: (label index, label name) for sst and
    cfimdb, (label index, paraphrase probability) for quora, (score clamped to 0-5, raw
    score) for sts."""
    kind = KINDS[task.spec.kind]
    predicted = kind.predict(output)
    return list(zip(predicted.tolist(), kind.detail(output, predicted, task.spec)))


def predict_texts(model: torch.nn.Module, task: Task, rows: Sequence[tuple[str, ...]],
                  device: torch.device, batch_size: int = 32) -> list[tuple]:
    """(prediction, detail) per row, in order (see decide)."""
    return decide(task, texts_outputs(model, task, rows, device, batch_size))


def predict_ensemble(members: list[ensemble.Member], task_name: str,
                     rows: Sequence[tuple[str, ...]], device: torch.device,
                     batch_size: int = 32) -> list[tuple]:
    """(prediction, detail) per row from the members' averaged outputs (tasks.average)."""
    found = [texts_outputs(m.model, m.tasks[task_name], rows, device, batch_size) for m in members]
    task = members[0].tasks[task_name]
    return decide(task, average(task.spec.kind, found))


def load_members(paths: list[str], task_name: str, device: torch.device,
                 precision: str = "fp32") -> list[ensemble.Member]:
    """Each checkpoint's model and its `task_name` task, checked to mean the same."""
    members = []
    for path in paths:
        model, task = load_model(path, task_name, device, precision)
        members.append(ensemble.Member(path, model, {task_name: task}))
    ensemble.check_agree(members)
    return members


def predict(cfg: PredictConfig) -> list[str]:
    """Read, predict, write; returns the output lines."""
    if cfg.output:
        check_output_file(cfg.output)  # before the work, not after it
        check_output("--output", cfg.output, (*repeated("load", cfg.load), cfg.input), file=True)
    device = choose_device(cfg.use_gpu)
    members = load_members(repeated("load", cfg.load), cfg.task, device, cfg.precision)
    rows = parse_rows(read_lines(cfg.input or None), SPECS[cfg.task].pair, cfg.input or STDIN)
    if len(members) == 1:
        results = predict_texts(members[0].model, members[0].tasks[cfg.task], rows, device,
                                cfg.batch_size)
    else:
        results = predict_ensemble(members, cfg.task, rows, device, cfg.batch_size)
    lines = ["\t".join([format_prediction(p), format_prediction(d), *texts])
             for (p, d), texts in zip(results, rows)]
    text = "".join(line + "\n" for line in lines)
    if cfg.output:
        atomic_write(cfg.output, lambda f: f.write(text))
    else:
        sys.stdout.write(text)
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    return predict(parse_config(PredictConfig, argv, description=__doc__))


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
