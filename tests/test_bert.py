import pytest
import torch

from bert import BertModel, mean_pool
from config import BertConfig, ConfigError


def batch(config, lengths, max_len=None):
    max_len = max_len or max(lengths)
    ids = torch.randint(5, config.vocab_size, (len(lengths), max_len))
    mask = (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_shapes(tiny_config):
    model = BertModel(tiny_config).eval()
    ids, mask = batch(tiny_config, [7, 3, 5])
    out = model(ids, mask)
    assert out.last_hidden_state.shape == (3, 7, tiny_config.hidden_size)
    assert out.pooler_output.shape == (3, tiny_config.hidden_size)
    assert out.pooler_output.abs().max() <= 1.0  # tanh


def test_explicit_attention_equals_fused(tiny_config):
    model = BertModel(tiny_config).eval()
    ids, mask = batch(tiny_config, [9, 4, 6])
    with torch.no_grad():
        fused = model(ids, mask)
        model.set_fused_attention(False)
        explicit = model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(explicit.last_hidden_state[real], fused.last_hidden_state[real],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit.pooler_output, fused.pooler_output, rtol=1e-5, atol=1e-5)


def test_explicit_and_fused_gradients_agree(tiny_config):
    model = BertModel(tiny_config).eval()
    ids, mask = batch(tiny_config, [6, 3])
    grads = []
    for fused in (True, False):
        model.zero_grad()
        model.set_fused_attention(fused)
        model(ids, mask).pooler_output.sum().backward()
        grads.append(model.bert_layers[0].self_attention.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_padding_does_not_change_real_positions(tiny_config, fused):
    model = BertModel(tiny_config, fused_attention=fused).eval()
    ids, mask = batch(tiny_config, [5])
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = model(ids, mask)
        long = model(padded_ids, padded_mask)
    torch.testing.assert_close(long.last_hidden_state[:, :5], short.last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(long.pooler_output, short.pooler_output, rtol=1e-5, atol=1e-5)


def test_token_types_are_used(tiny_config):
    model = BertModel(tiny_config).eval()
    ids, mask = batch(tiny_config, [6])
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        plain = model(ids, mask).last_hidden_state
        paired = model(ids, mask, types).last_hidden_state
    assert not torch.allclose(plain, paired)


def test_dropout_only_in_training(tiny_config):
    model = BertModel(tiny_config.replace(hidden_dropout_prob=0.5))
    ids, mask = batch(tiny_config, [6, 6])
    model.train()
    assert not torch.allclose(model(ids, mask).pooler_output, model(ids, mask).pooler_output)
    model.eval()
    torch.testing.assert_close(model(ids, mask).pooler_output, model(ids, mask).pooler_output)


def test_too_long_input_is_a_clear_error(tiny_config):
    model = BertModel(tiny_config)
    ids = torch.ones(1, tiny_config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_config_validation():
    with pytest.raises(ConfigError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ConfigError, match="model_type"):
        BertConfig.from_dict({"model_type": "roberta"}, source="x/config.json")


def test_config_from_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "bert", "hidden_size": 64, "num_attention_heads": 8, '
                    '"architectures": ["BertModel"], "use_cache": true}')
    config = BertConfig.from_json(str(path))
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (64, 8, 8)
    path.write_text('{"hidden_size": 65, "num_attention_heads": 8}')
    with pytest.raises(ConfigError, match=f"{path}.*divisible"):
        BertConfig.from_json(str(path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BertConfig.from_json(str(path))
