"""Digests of every output file of a fixed set of short runs on a tiny random checkpoint:
both training scripts, the four multitask modes (and the aggregator, balancing, aux,
fp16 and accumulation paths), a 2-row grid and an export. Run it before and after a
refactor that must keep behaviour bitwise, and compare the two JSON files:

    python scripts/behaviour_digest.py --out /tmp/before.json
    python scripts/behaviour_digest.py --out /tmp/after.json --compare /tmp/before.json

best.pt and last.pt are digested tensor by tensor (their pickles hold paths and
pickle-order details); config.json is digested without the folder paths.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

WORK = "/tmp/minbert-digest"
RUNS = {
    "classifier": ["classifier.py", "--task", "sst", "--option", "finetune", "--epochs", "2"],
    "pretrain": ["multitask_classifier.py", "--option", "pretrain", "--epochs", "2"],
    "seq": ["multitask_classifier.py", "--mode", "seq", "--epochs", "2"],
    "mix": ["multitask_classifier.py", "--mode", "mix", "--epochs", "2",
            "--grad_diagnostics_every", "2"],
    "pcgrad": ["multitask_classifier.py", "--mode", "mix", "--pcgrad", "--epochs", "2",
               "--aux", "{data}/yelp-aux-train.csv"],
    "aligned": ["multitask_classifier.py", "--aggregator", "aligned_mtl", "--balance",
                "grad_norm", "--epochs", "2", "--sts_encoding", "cross", "--quora_encoding", "bi"],
    "fp16": ["multitask_classifier.py", "--precision", "fp16", "--epochs", "1",
             "--grad_accumulation", "2", "--pcgrad"],
}
COMMON = ["--checkpoint", "{ckpt}", "--data_dir", "{data}", "--no-progress", "--lr", "1e-3",
          "--save_every_steps", "3", "--max_length", "32"]


def make_inputs() -> tuple[str, str]:
    import torch
    from bert import BertModel
    from config import BertConfig
    from conftest import SPECIAL, WORDS
    from helpers import to_hf_state_dict, write_checkpoint, write_tiny_data
    vocab = SPECIAL + WORDS
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    ckpt = write_checkpoint(os.path.join(WORK, "ckpt"), config,
                            to_hf_state_dict(BertModel(config)), vocab=vocab)
    data = os.path.join(WORK, "data")
    os.makedirs(data, exist_ok=True)
    return ckpt, write_tiny_data(data)


def unfused(model: dict) -> dict:
    """A fused qkv tensor as its query, key and value blocks under their names from before
    the fusion, so that digests stay comparable with ones taken before it."""
    out = {}
    for key, tensor in model.items():
        if ".self_attention.qkv." in key:
            for name, block in zip(("query", "key", "value"), tensor.chunk(3)):
                out[key.replace(".qkv.", f".{name}.")] = block.contiguous()
        else:
            out[key] = tensor
    return out


def digest_file(path: str) -> str | dict:
    if path.endswith(".pt"):
        import torch
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest()[:16]
                for k, v in unfused(saved.get("model", {})).items()}
    with open(path, "rb") as f:
        raw = f.read()
    if os.path.basename(path) == "config.json" and b"run_dir" in raw:
        saved = json.loads(raw)
        for key in ("run_dir", "checkpoint", "data_dir", "aux", "resume", "config"):
            saved.pop(key, None)
        raw = json.dumps(saved, sort_keys=True).encode()
    if path.endswith(".jsonl") and os.path.basename(path) == "metrics.jsonl":
        records = [json.loads(line) for line in raw.decode().splitlines()]
        for record in records:
            record.pop("seconds", None)
        raw = json.dumps(records, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def digest_tree(folder: str) -> dict:
    out = {}
    for base, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            if rel.startswith("logs") or name.endswith((".png", ".lock")):
                continue
            out[rel] = digest_file(path)
    return out


def run(argv: list[str], ckpt: str, data: str, run_dir: str | None, flags: list[str]) -> None:
    argv = [a.format(ckpt=ckpt, data=data) for a in argv]
    if run_dir:
        argv += [a.format(ckpt=ckpt, data=data) for a in COMMON] + flags + ["--run_dir", run_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINBERT_DATA_DIR": data}
    subprocess.run([sys.executable] + argv, cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", default="")
    parser.add_argument("--flags", default="", help="more flags for every training run "
                        "(e.g. --flags=--no-packed), grid's rows included")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    ckpt, data = make_inputs()
    digests = {}
    for name, argv in RUNS.items():
        folder = os.path.join(WORK, "runs", name)
        run(argv, ckpt, data, folder, args.flags.split())
        digests[name] = digest_tree(folder)
    grid = os.path.join(WORK, "grid")
    run(["grid.py", "--rows", "finetune-mix-0.3,finetune-mix-pcgrad-0.3", "--epochs", "1",
         "--runs_dir", grid, "--data_dir", data, "--checkpoint", ckpt, "--finetune_lr", "1e-3",
         f"--extra=--no-progress --max_length 32 {args.flags}".rstrip()], ckpt, data, None, [])
    digests["grid"] = digest_tree(grid)
    export = os.path.join(WORK, "export")
    run(["export.py", "--load", os.path.join(WORK, "runs", "mix", "best.pt"), "--out", export],
        ckpt, data, None, [])
    digests["export"] = {k: v for k, v in digest_tree(export).items() if k != "heads.json"}
    with open(args.out, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
    count = sum(len(v) for v in digests.values())
    print(f"{count} files digested into {args.out}")
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        diff = [f"{run}/{path}" for run in sorted(set(before) | set(digests))
                for path in sorted(set(before.get(run, {})) | set(digests.get(run, {})))
                if before.get(run, {}).get(path) != digests.get(run, {}).get(path)]
        print("identical" if not diff else "DIFFERENT:\n  " + "\n  ".join(diff))
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
