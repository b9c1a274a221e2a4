import os
import re

import numpy as np
import pytest
import torch

from base_bert import CheckpointError, from_pretrained
from bert import BertModel
from helpers import to_hf_state_dict, write_checkpoint

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained().eval()


@pytest.mark.parametrize("fused", [True, False])
def test_packaged_checkpoint_matches_reference(minilm, fused):
    ref = np.load(FIXTURE)
    minilm.set_fused_attention(fused)
    with torch.no_grad():
        out = minilm(torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"]),
                     torch.from_numpy(ref["token_type_ids"]))
    minilm.set_fused_attention(True)
    real = ref["attention_mask"].astype(bool)
    hidden_diff = np.abs(out.last_hidden_state.numpy() - ref["last_hidden_state"])[real].max()
    pooler_diff = np.abs(out.pooler_output.numpy() - ref["pooler_output"]).max()
    assert hidden_diff <= 1e-5 and pooler_diff <= 1e-5, (hidden_diff, pooler_diff)


def outputs(model, config):
    ids = torch.randint(5, config.vocab_size, (2, 6))
    with torch.no_grad():
        return model.eval()(ids).pooler_output


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_roundtrip_through_hf_names(tmp_path, tiny_config, fmt):
    source = BertModel(tiny_config)
    folder = write_checkpoint(tmp_path / "ckpt", tiny_config, to_hf_state_dict(source), fmt)
    loaded = from_pretrained(folder)
    torch.manual_seed(1)
    expected = outputs(source, tiny_config)
    torch.manual_seed(1)
    torch.testing.assert_close(outputs(loaded, tiny_config), expected)


def test_accepted_variants(tmp_path, tiny_config):
    """`bert.` prefix, gamma/beta LayerNorm names, position_ids and MLM-head keys."""
    state = to_hf_state_dict(BertModel(tiny_config))
    renamed = {}
    for key, value in state.items():
        key = "bert." + key
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        renamed[key] = value
    renamed["bert.embeddings.position_ids"] = torch.arange(tiny_config.max_position_embeddings)[None]
    renamed["cls.predictions.bias"] = torch.zeros(tiny_config.vocab_size)
    folder = write_checkpoint(tmp_path / "v", tiny_config, renamed)
    loaded = from_pretrained(folder)
    torch.testing.assert_close(loaded.embed_layer_norm.weight,
                               state["embeddings.LayerNorm.weight"])


def test_unknown_key_is_named(tmp_path, tiny_config):
    state = to_hf_state_dict(BertModel(tiny_config))
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    folder = write_checkpoint(tmp_path / "u", tiny_config, state)
    with pytest.raises(CheckpointError, match="unknown.*attention.self.rotary.weight"):
        from_pretrained(folder)


@pytest.mark.parametrize("key", ["encoder.layer.1.output.dense.bias",
                                 # one of the three blocks of a fused qkv
                                 "encoder.layer.1.attention.self.key.weight",
                                 "encoder.layer.0.attention.self.query.bias"])
def test_missing_key_is_named(tmp_path, tiny_config, key):
    state = to_hf_state_dict(BertModel(tiny_config))
    del state[key]
    folder = write_checkpoint(tmp_path / "m", tiny_config, state)
    with pytest.raises(CheckpointError, match=rf"missing checkpoint keys: {re.escape(key)}$"):
        from_pretrained(folder)


@pytest.mark.parametrize("key, shape", [("pooler.dense.weight", (3, 3)),
                                        ("encoder.layer.0.attention.self.value.bias", (5,)),
                                        # the fused qkv's shape, for one of its blocks
                                        ("encoder.layer.1.attention.self.key.weight", "qkv")])
def test_misshaped_key_is_named(tmp_path, tiny_config, key, shape):
    state = to_hf_state_dict(BertModel(tiny_config))
    hidden = tiny_config.hidden_size
    shape = (3 * hidden, hidden) if shape == "qkv" else shape
    state[key] = torch.zeros(shape)
    folder = write_checkpoint(tmp_path / "s", tiny_config, state)
    named = re.escape(f"{key}' has shape {shape}")
    with pytest.raises(CheckpointError, match=named):
        from_pretrained(folder)


def test_a_block_given_twice_is_named(tmp_path, tiny_config):
    state = to_hf_state_dict(BertModel(tiny_config))
    state["bert.encoder.layer.0.attention.self.value.weight"] = torch.zeros(
        tiny_config.hidden_size, tiny_config.hidden_size)
    folder = write_checkpoint(tmp_path / "d", tiny_config, state)
    with pytest.raises(CheckpointError, match=r"two checkpoint keys map to "
                       r"'bert_layers.0.self_attention.qkv.weight' \(block 3 of 3\)"):
        from_pretrained(folder)


def test_qkv_is_query_key_value_in_that_order(tmp_path, tiny_config):
    """HF's separate projections are the row blocks of our fused one, in q, k, v order,
    both ways (the order against transformers itself: the reference-output test)."""
    model = BertModel(tiny_config)
    state = to_hf_state_dict(model)
    hidden = tiny_config.hidden_size
    for layer, ours in enumerate(model.bert_layers):
        for param in ("weight", "bias"):
            fused = getattr(ours.self_attention.qkv, param)
            for i, name in enumerate(("query", "key", "value")):
                theirs = state[f"encoder.layer.{layer}.attention.self.{name}.{param}"]
                assert torch.equal(theirs, fused[i * hidden:(i + 1) * hidden]), (layer, name)
    distinct = {k: torch.randn(v.shape) if ".attention.self." in k else v for k, v in state.items()}
    loaded = from_pretrained(write_checkpoint(tmp_path / "q", tiny_config, distinct))
    for layer, ours in enumerate(loaded.bert_layers):
        expected = torch.cat([distinct[f"encoder.layer.{layer}.attention.self.{name}.weight"]
                              for name in ("query", "key", "value")])
        assert torch.equal(ours.self_attention.qkv.weight, expected)


def test_missing_folder_and_weights(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="not found"):
        from_pretrained(str(tmp_path / "nowhere"))
    folder = write_checkpoint(tmp_path / "w", tiny_config, {})
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no weights"):
        from_pretrained(folder)


def test_config_overrides(tmp_path, tiny_config):
    folder = write_checkpoint(tmp_path / "o", tiny_config, to_hf_state_dict(BertModel(tiny_config)))
    model = from_pretrained(folder, hidden_dropout_prob=0.3)
    assert model.config.hidden_dropout_prob == 0.3
