"""Export a trained run as a Hugging Face BERT folder, with its task heads beside it.

    python export.py --load runs/<run>/best.pt --out exported/<name>

The folder loads with `transformers.BertModel.from_pretrained` / `AutoTokenizer`, and with
this project's own `base_bert.from_pretrained`. The task heads are written beside the
encoder (heads.safetensors + heads.json, which says how to apply each head by hand). A run
whose STS head is a bi-encoder (5 * cosine of mean-pooled sentences) also gets the
sentence-transformers files, so that `SentenceTransformer(folder)` embeds as the run did.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from base_bert import (default_checkpoint_path, load_pretrained, to_hf_config,
                       to_hf_state_dict)
from bert import BertModel
from engine.cli import parse_config, run_cli
from config import BertConfig
from engine.errors import CheckpointError, ConfigError
from engine.heads import head_kind
from engine.paths import check_kind
from engine.run import SAVED_KEYS
from engine.runfiles import file_mode
from engine.specs import AUX, SPECS, TaskSpec
from tokenizer import lowercase_of
from utils import load_checkpoint

HEADS_FORMAT = "minbert-mtl heads v1"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}
POOLING_TEXT = {
    "mean": "x = mean of last_hidden_state over the tokens whose attention_mask is 1 "
            "([CLS] and [SEP] included)",
    "cls": "x = last_hidden_state[:, 0] (the [CLS] token)",
    "pooler": "x = pooler_output = tanh(pooler.dense(last_hidden_state[:, 0]))",
}
SINGLE_INPUT = "one sentence: [CLS] s [SEP], token_type_ids all 0"
CROSS_INPUT = ("the pair as one input: [CLS] a [SEP] b [SEP], token_type_ids 0 up to the "
               "first [SEP] and 1 after it; truncated longest-first to max_length")
BI_INPUT = ("each sentence encoded alone as [CLS] s [SEP]; u, v = the mean of "
            "last_hidden_state over the tokens whose attention_mask is 1, per sentence")


@dataclass
class ExportConfig:
    load: str = field(default="", metadata={"help": "a run's best.pt"})
    out: str = field(default="", metadata={"help": "the folder to write (must not exist or be empty)"})
    checkpoint: str = field(default="", metadata={
        "help": "folder holding the vocab.txt (and tokenizer_config.json) the run was trained "
                "with (default: the run's --checkpoint, else the packaged all-MiniLM-L6-v2)"})
    force: bool = field(default=False, metadata={"help": "replace a non-empty --out folder"})
    sentence_transformers: bool = field(default=True, metadata={
        "help": "write the sentence-transformers files when the STS head is a bi-encoder"})

    def __post_init__(self) -> None:
        for name in ("load", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")


# --- reading the run --------------------------------------------------------------------

def read_run(path: str) -> dict:
    """A best.pt, checked to be a training checkpoint; anything else raises CheckpointError
    naming the file."""
    check_kind("--load", path, "model")
    saved = load_checkpoint(path, SAVED_KEYS)
    if not isinstance(saved["model"], dict) or not all(
            isinstance(v, torch.Tensor) for v in saved["model"].values()):
        raise CheckpointError(f"{path}: its 'model' is not a state dict")
    return saved


@dataclass
class HeadPlan:
    task: str
    spec: TaskSpec
    kind: str  # linear, bi_cosine, bi_features
    pooling: str  # the linear heads' sentence vector; "mean" for bi-encoders


def plan_heads(run_config: dict, source: str) -> list[HeadPlan]:
    """The heads a run trained, from its config: multitask runs name `tasks` (with pair
    encodings and an optional `aux`), classifier.py runs one `task`."""
    pooling = run_config.get("pooling", "mean")
    if "tasks" in run_config:
        names = [n for n in str(run_config["tasks"]).split(",") if n]
        encodings = {"quora": run_config.get("quora_encoding", "cross"),
                     "sts": run_config.get("sts_encoding", "cross")}
    elif "task" in run_config:
        names, encodings = [run_config["task"]], {}
    else:
        raise CheckpointError(f"{source}: its config names no task ('tasks' or 'task')")
    plans = []
    for name in names:
        if name not in SPECS:
            raise CheckpointError(f"{source}: unknown task {name!r} in its config")
        spec = SPECS[name]
        kind = head_kind(spec, encodings.get(name, "cross"))
        plans.append(HeadPlan(name, spec, kind, "mean" if kind != "linear" else pooling))
    if run_config.get("aux"):
        plans.append(HeadPlan("aux", AUX, head_kind(AUX, "cross"), pooling))
    return plans


def split_state(state: dict[str, torch.Tensor], source: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """'encoder.<key>' -> the encoder's state; 'heads.<task>.<param>' -> per task."""
    encoder, heads = {}, {}
    for key, tensor in state.items():
        if key.startswith("encoder."):
            encoder[key.removeprefix("encoder.")] = tensor
        elif key.startswith("heads.") and key.count(".") >= 2:
            task, param = key.removeprefix("heads.").split(".", 1)
            heads.setdefault(task, {})[param] = tensor
        else:
            raise CheckpointError(f"{source}: unexpected model key {key!r}")
    return encoder, heads


def check_head(plan: HeadPlan, params: dict[str, torch.Tensor], hidden: int, source: str) -> None:
    expected = {} if plan.kind == "bi_cosine" else {
        "linear.weight": (1 if plan.kind == "bi_features" else plan.spec.num_outputs,
                          4 * hidden if plan.kind == "bi_features" else hidden)}
    if expected:
        expected["linear.bias"] = (expected["linear.weight"][0],)
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    if shapes != expected:
        raise CheckpointError(f"{source}: head {plan.task!r} ({plan.kind}) has tensors {shapes}, "
                              f"expected {expected}")


# --- what is written ---------------------------------------------------------------------

def describe_head(plan: HeadPlan, params: dict[str, torch.Tensor], dev: dict) -> dict[str, Any]:
    """One heads.json entry: enough to apply the head by hand to the exported encoder."""
    spec, task = plan.spec, plan.task
    outputs = 1 if plan.kind != "linear" else spec.num_outputs
    entry: dict[str, Any] = {"task": task, "kind": plan.kind, "pooling": plan.pooling,
                             "pair": spec.pair, "num_outputs": outputs,
                             "tensors": {f"{task}.{k}": list(v.shape) for k, v in params.items()}}
    if plan.kind == "linear":
        entry["input"] = CROSS_INPUT if spec.pair else SINGLE_INPUT
        entry["formula"] = (f"{POOLING_TEXT[plan.pooling]}; output = x @ {task}.linear.weight.T "
                            f"+ {task}.linear.bias")
    elif plan.kind == "bi_features":
        entry["input"] = BI_INPUT
        entry["formula"] = (f"output = concat([u, v, |u - v|, u * v]) @ {task}.linear.weight.T "
                            f"+ {task}.linear.bias")
    else:
        entry["input"] = BI_INPUT
        entry["formula"] = "output = 5 * cosine_similarity(u, v)"
    if spec.kind == "classification":
        entry["output"] = f"logits over the labels 0..{outputs - 1}"
        entry["prediction"] = "argmax of the logits"
        entry["labels"] = list(spec.label_names) or [str(i) for i in range(outputs)]
    elif spec.kind == "binary":
        entry["output"] = ("one logit (squeezed): sigmoid(output) is the probability that "
                           "the two questions are paraphrases")
        entry["prediction"] = "1 (paraphrase) when output > 0, i.e. probability > 0.5"
        entry["labels"] = list(spec.label_names)
    else:
        entry["output"] = "one similarity score (squeezed) on the 0-5 scale of the STS labels"
        entry["prediction"] = "output clamped to [0, 5]"
    entry["metric"] = spec.metric if spec.evaluated else None
    entry["dev"] = dev.get(task) if spec.evaluated else None
    return entry


def tokenizer_files(lowercase: bool, max_length: int) -> dict[str, dict]:
    return {
        "tokenizer_config.json": {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
                                  "model_max_length": max_length, "strip_accents": None,
                                  "tokenize_chinese_chars": True, **SPECIAL_TOKENS},
        "special_tokens_map.json": dict(SPECIAL_TOKENS),
    }


def sentence_transformers_files(hidden: int, max_length: int) -> dict[str, Any]:
    """Transformer (the folder itself) then mean pooling: no Normalize, so that embeddings
    equal our mean-pooled vectors; the tokenizer lowercases, hence do_lower_case false."""
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"}],
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "config_sentence_transformers.json": {"similarity_fn_name": "cosine", "prompts": {},
                                              "default_prompt_name": None},
        os.path.join("1_Pooling", "config.json"): {
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False, "include_prompt": True},
    }


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_folder(out: str, force: bool, fill: Callable[[str], None]) -> None:
    """Fill a temporary folder beside `out`, then rename it to `out`: a failed export
    leaves no half-written folder. An existing non-empty `out` is replaced only with force."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ConfigError(f"--out {out}: folder is not empty (pass --force to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    old = tmp + ".old"
    try:
        fill(tmp)
        # mkdtemp makes 0700 and safetensors 0600 files: exports are for sharing.
        for folder, _, files in os.walk(tmp):
            os.chmod(folder, file_mode(0o777))
            for name in files:
                os.chmod(os.path.join(folder, name), file_mode())
        if os.path.isdir(out):
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if os.path.isdir(old):
                os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(cfg: ExportConfig) -> str:
    from safetensors.torch import save_file
    saved = read_run(cfg.load)
    run_config = saved["config"]
    try:
        bert_config = BertConfig(**saved["bert_config"])
    except (TypeError, ConfigError) as err:
        raise CheckpointError(f"{cfg.load}: bad bert_config ({err})") from None
    encoder_state, head_params = split_state(saved["model"], cfg.load)
    encoder = BertModel(bert_config)
    try:
        encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{cfg.load}: its encoder does not fit its bert_config "
                              f"({str(err).splitlines()[0]})") from None
    plans = plan_heads(run_config, cfg.load)
    unplanned = sorted(set(head_params) - {p.task for p in plans})
    if unplanned:
        raise CheckpointError(f"{cfg.load}: heads not named by its config: {', '.join(unplanned)}")
    for plan in plans:
        check_head(plan, head_params.get(plan.task, {}), bert_config.hidden_size, cfg.load)

    source = cfg.checkpoint or run_config.get("checkpoint") or default_checkpoint_path()
    vocab = os.path.join(source, "vocab.txt")
    if not os.path.isfile(vocab):
        raise CheckpointError(f"{vocab}: vocabulary file not found (pass --checkpoint with "
                                "the folder the run was trained from)")
    with open(vocab, encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    if vocab_size > bert_config.vocab_size:
        raise CheckpointError(f"{vocab}: {vocab_size} tokens, but the encoder has only "
                              f"{bert_config.vocab_size} embeddings")
    max_length = int(run_config.get("max_length", 128))
    hidden = bert_config.hidden_size
    dev = saved.get("dev") or {}
    heads_json = {
        "format": HEADS_FORMAT,
        "encoder": "this folder (config.json, model.safetensors, vocab.txt)",
        "max_length": max_length, "hidden_size": hidden,
        "source": {"checkpoint": os.path.abspath(cfg.load), "epoch": saved.get("epoch"),
                   "overall": saved.get("overall")},
        "heads": [describe_head(p, head_params.get(p.task, {}), dev) for p in plans],
    }
    heads_tensors = {f"{task}.{k}": v.detach().cpu().clone().contiguous()
                     for task, params in head_params.items() for k, v in params.items()}
    with_st = cfg.sentence_transformers and any(p.kind == "bi_cosine" for p in plans)

    def fill(folder: str) -> None:
        write_json(os.path.join(folder, "config.json"), to_hf_config(bert_config))
        save_file(to_hf_state_dict(encoder), os.path.join(folder, "model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copyfile(vocab, os.path.join(folder, "vocab.txt"))
        for name, obj in tokenizer_files(lowercase_of(source), max_length).items():
            write_json(os.path.join(folder, name), obj)
        save_file(heads_tensors, os.path.join(folder, "heads.safetensors"),
                  metadata={"format": "pt"})
        write_json(os.path.join(folder, "heads.json"), heads_json)
        if with_st:
            for name, obj in sentence_transformers_files(hidden, max_length).items():
                write_json(os.path.join(folder, name), obj)
        # The written folder must read back, through our strict loader, to the same tensors.
        reloaded = load_pretrained(BertModel(bert_config), folder).state_dict()
        for key, tensor in encoder.state_dict().items():
            if not torch.equal(reloaded[key], tensor):
                raise CheckpointError(f"{folder}: {key} does not read back as written")

    write_folder(cfg.out, cfg.force, fill)
    print(f"exported {cfg.load} (epoch {saved.get('epoch')}; heads "
          f"{', '.join(f'{p.task} ({p.kind})' for p in plans)}) to {cfg.out}"
          f"{'; with sentence-transformers files' if with_st else ''}")
    return cfg.out


def main(argv: list[str] | None = None) -> str:
    """Returns the export folder."""
    return export(parse_config(ExportConfig, argv, description=__doc__))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
