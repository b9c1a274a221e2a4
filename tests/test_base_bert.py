import os

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


def test_missing_key_is_named(tmp_path, tiny_config):
    state = to_hf_state_dict(BertModel(tiny_config))
    del state["encoder.layer.1.output.dense.bias"]
    folder = write_checkpoint(tmp_path / "m", tiny_config, state)
    with pytest.raises(CheckpointError, match="missing.*encoder.layer.1.output.dense.bias"):
        from_pretrained(folder)


def test_misshaped_key_is_named(tmp_path, tiny_config):
    state = to_hf_state_dict(BertModel(tiny_config))
    state["pooler.dense.weight"] = torch.zeros(3, 3)
    folder = write_checkpoint(tmp_path / "s", tiny_config, state)
    with pytest.raises(CheckpointError, match=r"pooler.dense.weight.*\(3, 3\)"):
        from_pretrained(folder)


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
