"""Test helpers: tiny HF-format checkpoints written from our models."""
import json
import os

import torch
from safetensors.torch import save_file

from base_bert import to_hf_config, to_hf_state_dict  # noqa: F401 (re-exported for the tests)
from config import BertConfig


def write_checkpoint(folder, config: BertConfig, state: dict, fmt: str = "safetensors",
                     vocab: list[str] | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    raw = to_hf_config(config)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    if fmt == "safetensors":
        save_file(state, os.path.join(folder, "model.safetensors"))
    else:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    if vocab is not None:
        with open(os.path.join(folder, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
    return str(folder)


def write_tsv(path, header: list[str], rows: list[list]) -> str:
    with open(path, "w") as f:
        f.write("\t".join([""] + header) + "\n")
        for i, row in enumerate(rows):
            f.write("\t".join([str(i)] + [str(v) for v in row]) + "\n")
    return str(path)


def write_tiny_data(folder, n: int = 24) -> str:
    """SST/CFIMDB/Yelp: the adjective decides the label; Quora: same question or not;
    STS: shared words decide the score."""
    import random
    rng = random.Random(0)
    adjectives = ["awful", "bad", "fine", "good", "great"]
    questions = ["how do i cook rice ?", "how do i learn piano ?", "what is a cat ?",
                 "what is a dog ?"]
    scenes = ["a man plays guitar .", "a woman sings .", "the cat sits .", "the dog runs ."]
    for split in ("train", "dev"):
        sst = [[f"{split}{i}", f"the movie is {adjectives[i % 5]} .", i % 5] for i in range(n)]
        write_tsv(f"{folder}/ids-sst-{split}.csv", ["id", "sentence", "sentiment"], sst)
        imdb = [[f"{split}{i}", f"the film was {adjectives[4 * (i % 2)]}", i % 2] for i in range(n)]
        write_tsv(f"{folder}/ids-cfimdb-{split}.csv", ["id", "sentence", "sentiment"], imdb)
        quora = []
        for i in range(n):
            a, b = rng.choice(questions), rng.choice(questions)
            quora.append([f"{split}{i}", a, b, f"{float(a == b)}"])
        write_tsv(f"{folder}/quora-{split}.csv", ["id", "sentence1", "sentence2", "is_duplicate"], quora)
        sts = []
        for i in range(n):
            a, b = rng.choice(scenes), rng.choice(scenes)
            sts.append([f"{split}{i}", a, b, 5.0 if a == b else rng.choice([0.0, 0.4, 1.2])])
        write_tsv(f"{folder}/sts-{split}.csv", ["id", "sentence1", "sentence2", "similarity"], sts)
    write_tsv(f"{folder}/ids-sst-test-student.csv", ["id", "sentence"],
              [[f"t{i}", f"the movie is {adjectives[i % 5]} ."] for i in range(6)])
    write_tsv(f"{folder}/sts-test-student.csv", ["id", "sentence1", "sentence2"],
              [[f"t{i}", scenes[i % 4], scenes[0]] for i in range(6)])
    write_tsv(f"{folder}/yelp-aux-train.csv", ["id", "sentence", "sentiment"],
              [[f"y{i}", f"the film is {adjectives[i % 5]}", i % 5] for i in range(n)])
    return str(folder)
