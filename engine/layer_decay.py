"""Layer-wise learning-rate decay (Clark et al., ELECTRA, 2020; Bao et al., BEiT, 2022):
the encoder's layer l of L (1-based, the top is L) trains at lr * D^(L - l), the embeddings
at lr * D^L, the pooler and the task heads at the head lr.

Which layer a parameter belongs to comes from bert.BertModel's own structure: the
parameters of its layer stack (`bert_layers`, a ModuleList: its index + 1), of its
pooler (`pooler_dense`), and of the modules `embed` reads. An encoder parameter none of
these reach is an error, not silently given some rate. The word embedding keeps its
Parameter when row_gradients wraps its module, so its group (and rate) is the same.
"""
from __future__ import annotations

from torch import nn

LAYERS = "bert_layers"
POOLER = "pooler_dense"
EMBEDDINGS = ("word_embedding", "pos_embedding", "tk_type_embedding", "embed_layer_norm")


def encoder_depths(encoder: nn.Module) -> dict[int, int | None]:
    """id(parameter) -> its depth: 0 for the embeddings, l for layer l, None for the
    pooler (which trains with the heads)."""
    depth: dict[int, int | None] = {}
    for l, layer in enumerate(getattr(encoder, LAYERS), start=1):
        depth.update((id(p), l) for p in layer.parameters())
    depth.update((id(p), None) for p in getattr(encoder, POOLER).parameters())
    for name in EMBEDDINGS:
        depth.update((id(p), 0) for p in getattr(encoder, name).parameters())
    unassigned = [name for name, p in encoder.named_parameters() if id(p) not in depth]
    if unassigned:
        raise ValueError(f"--layer_decay: encoder parameters in no layer: {', '.join(unassigned)} "
                         f"(engine/layer_decay.py maps {LAYERS}, {POOLER} and {', '.join(EMBEDDINGS)})")
    return depth


def layer_groups(encoder: nn.Module, encoder_params, head_params, lr: float, head_lr: float,
                 decay: float) -> list[dict]:
    """AdamW's parameter groups: one per layer from the top down (so that group 0, whose
    rate steps.jsonl logs, is at lr itself), then the embeddings, then the heads and the
    pooler. Frozen parameters are left out, and so are groups left empty."""
    depth = encoder_depths(encoder)
    top = len(getattr(encoder, LAYERS))
    trainable = [p for p in encoder_params if p.requires_grad]
    groups = [{"params": [p for p in trainable if depth[id(p)] == l], "lr": lr * decay ** (top - l),
               "name": f"layer {l}" if l else "embeddings"} for l in range(top, -1, -1)]
    heads = [p for p in trainable if depth[id(p)] is None]
    heads += [p for p in head_params if p.requires_grad]
    groups.append({"params": heads, "lr": head_lr, "name": "heads"})
    return [g for g in groups if g["params"]]
