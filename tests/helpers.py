"""Test helpers: tiny HF-format checkpoints written from our models."""
import json
import os

import torch
from safetensors.torch import save_file

from base_bert import checkpoint_name_map
from config import BertConfig


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    ours_to_theirs = {v: k for k, v in checkpoint_name_map(model.config.num_hidden_layers).items()
                      if v is not None}
    return {ours_to_theirs[k]: v.detach().clone().contiguous()
            for k, v in model.state_dict().items()}


def write_checkpoint(folder, config: BertConfig, state: dict, fmt: str = "safetensors",
                     vocab: list[str] | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    raw = {k: getattr(config, k) for k in config.__dataclass_fields__}
    raw["model_type"] = "bert"
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
