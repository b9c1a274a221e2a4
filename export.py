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

from base_bert import default_checkpoint_path, load_pretrained, to_hf_config, to_hf_state_dict
from bert import BertModel
from engine.cli import parse_config, run_cli
from engine.errors import CheckpointError, ConfigError, UserError
from engine.runfiles import check_output, file_mode, read_json
from predict import load_trained
from tokenizer import BertTokenizer, lowercase_of, read_vocab

HEADS_FORMAT = "minbert-mtl heads v1"
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}
@dataclass
class ExportConfig:
    load: str = field(default="", metadata={"help": "a run's best.pt"})
    out: str = field(default="", metadata={"help": "the folder to write (must not exist or be empty)"})
    checkpoint: str = field(default="", metadata={
        "help": "for a best.pt without its own copy of the tokenizer (saved before it kept "
                "one): the folder holding the vocab.txt (and tokenizer_config.json) the run was "
                "trained with (default: the run's --checkpoint, else the packaged all-MiniLM-L6-v2)"})
    force: bool = field(default=False, metadata={
        "help": "replace an earlier export in --out (nothing else: not a run, not what it reads)"})
    sentence_transformers: bool = field(default=True, metadata={
        "help": "write the sentence-transformers files when the STS head is a bi-encoder"})

    def __post_init__(self) -> None:
        for name in ("load", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")


# --- what is written ---------------------------------------------------------------------

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


def is_export(folder: str) -> bool:
    """An earlier export (its heads.json says so): all that --force replaces."""
    try:
        heads = read_json(os.path.join(folder, "heads.json"))
    except (OSError, UserError):
        return False
    return isinstance(heads, dict) and heads.get("format") == HEADS_FORMAT


def write_folder(out: str, force: bool, fill: Callable[[str], None],
                 reads: tuple = ()) -> None:
    """Fill a temporary folder beside `out`, then rename it to `out`: a failed export
    leaves no half-written folder. An existing non-empty `out` is replaced only with force,
    and only if it is an earlier export (never what the export reads, nor a run)."""
    out = os.path.abspath(out)
    check_output("--out", out, reads, replace=is_export if force else None)
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ConfigError(f"--out {out}: folder is not empty (pass --force to replace an "
                          "earlier export)")
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


def run_vocabulary(saved: dict, run_config, cfg: ExportConfig) -> tuple[list[str], bool, str]:
    """The run's vocab.txt lines and lower-casing, and where they come from: best.pt's own
    copy, else (a best.pt saved before it kept one) the checkpoint folder."""
    if "tokenizer" in saved:
        tokenizer = BertTokenizer.from_state_dict(saved["tokenizer"], source=cfg.load)
        return tokenizer.lines, tokenizer.lowercase, f"{cfg.load} (its vocabulary)"
    source = cfg.checkpoint or run_config.checkpoint or default_checkpoint_path()
    vocab = os.path.join(source, "vocab.txt")
    if not os.path.isfile(vocab):
        raise CheckpointError(f"{vocab}: vocabulary file not found (pass --checkpoint with "
                              "the folder the run was trained from)")
    return read_vocab(vocab), lowercase_of(source), vocab


def heads_description(load: str, saved: dict, tasks: list, max_length: int, hidden: int) -> dict:
    """heads.json: what each head is and where it came from."""
    return {
        "format": HEADS_FORMAT,
        "encoder": "this folder (config.json, model.safetensors, vocab.txt)",
        "max_length": max_length, "hidden_size": hidden,
        "source": {"checkpoint": os.path.abspath(load), "epoch": saved.get("epoch"),
                   "overall": saved.get("overall")},
        "heads": [t.describe(saved.get("dev") or {}) for t in tasks],
    }


def check_reads_back(encoder: BertModel, folder: str) -> None:
    """The written folder must read back, through our strict loader, to the same tensors."""
    reloaded = load_pretrained(BertModel(encoder.config), folder).state_dict()
    for key, tensor in encoder.state_dict().items():
        if not torch.equal(reloaded[key], tensor):
            raise CheckpointError(f"{folder}: {key} does not read back as written")


def export(cfg: ExportConfig) -> str:
    from safetensors.torch import save_file
    # the model as it was trained, rebuilt through the run path with a strict load
    saved, run_config, model, tasks = load_trained(cfg.load, torch.device("cpu"),
                                                   checkpoint=cfg.checkpoint)
    encoder = model.encoder
    bert_config = encoder.config
    vocab, lowercase, vocab_source = run_vocabulary(saved, run_config, cfg)
    if len(vocab) > bert_config.vocab_size:
        raise CheckpointError(f"{vocab_source}: {len(vocab)} tokens, but the encoder has only "
                              f"{bert_config.vocab_size} embeddings")
    max_length = run_config.max_length
    hidden = bert_config.hidden_size
    heads_json = heads_description(cfg.load, saved, tasks, max_length, hidden)
    heads_tensors = {f"{t.name}.{k}": v.detach().cpu().clone().contiguous()
                     for t in tasks for k, v in t.head.state_dict().items()}
    with_st = cfg.sentence_transformers and any(t.head.kind == "bi_cosine" for t in tasks)

    def fill(folder: str) -> None:
        write_json(os.path.join(folder, "config.json"), to_hf_config(bert_config))
        save_file(to_hf_state_dict(encoder), os.path.join(folder, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8", newline="") as f:
            f.writelines(line + "\n" for line in vocab)
        for name, obj in tokenizer_files(lowercase, max_length).items():
            write_json(os.path.join(folder, name), obj)
        save_file(heads_tensors, os.path.join(folder, "heads.safetensors"),
                  metadata={"format": "pt"})
        write_json(os.path.join(folder, "heads.json"), heads_json)
        if with_st:
            for name, obj in sentence_transformers_files(hidden, max_length).items():
                write_json(os.path.join(folder, name), obj)
        check_reads_back(encoder, folder)

    write_folder(cfg.out, cfg.force, fill, reads=(cfg.load, run_config.checkpoint))
    print(f"exported {cfg.load} (epoch {saved.get('epoch')}; heads "
          f"{', '.join(f'{t.name} ({t.head.kind})' for t in tasks)}) to {cfg.out}"
          f"{'; with sentence-transformers files' if with_st else ''}")
    return cfg.out


def main(argv: list[str] | None = None) -> str:
    """Returns the export folder."""
    return export(parse_config(ExportConfig, argv, description=__doc__))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
