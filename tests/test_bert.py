import math

import pytest
import torch

from bert import ACTIVATIONS, BertModel, BertSelfAttention, extended_attention_mask, mean_pool
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
        grads.append(model.bert_layers[0].self_attention.qkv.weight.grad.clone())
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
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[6.0, 0.0], [-1.0, 1.0], [1.0, 2.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # by hand: ((1+3)/2, (2+4)/2) and ((6-1+1)/3, (0+1+2)/3)
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [2.0, 1.0]]))
    # an all-padding row gives zeros, not NaN
    torch.testing.assert_close(mean_pool(hidden[:1], torch.zeros(1, 3)), torch.zeros(1, 2))


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


# --- the formulas, against references written here from the papers --------------------------

def perturb(module, std=0.1):
    """Random biases and LayerNorm affines too (BERT's init makes them 0 and 1), so that a
    formula that drops or misplaces one of them shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))
    return module


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, norm, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, eps inside the sqrt
    return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


REFERENCE_ACTIVATIONS = {"gelu": gelu_erf, "relu": lambda x: x.clamp(min=0),
                         "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh}


def attention_by_hand(attention, config, hidden, attention_mask):
    """softmax(Q_h K_h^T / sqrt(d) + mask) V_h per head h, heads concatenated; the mask is
    applied by leaving the padding keys out altogether."""
    heads = config.num_attention_heads
    d = config.hidden_size // heads
    # the fused projection's weight rows are W_Q, W_K, W_V stacked (so its bias b_Q, b_K, b_V)
    q, k, v = (hidden @ w.T + b for w, b in zip(attention.qkv.weight.chunk(3),
                                                  attention.qkv.bias.chunk(3)))
    out = torch.zeros_like(hidden)
    for b in range(hidden.shape[0]):
        real = attention_mask[b].bool()
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[b, :, cols] @ k[b, real, cols].T / math.sqrt(d)  # (T, real)
            out[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, real, cols]
    return out


def bert_by_hand(model, config, ids, attention_mask, types):
    length = ids.shape[1]
    x = (model.word_embedding.weight[ids] + model.pos_embedding.weight[:length]
         + model.tk_type_embedding.weight[types])
    eps = config.layer_norm_eps
    x = layer_norm(x, model.embed_layer_norm, eps)
    act = REFERENCE_ACTIVATIONS[config.hidden_act]
    for layer in model.bert_layers:
        attended = attention_by_hand(layer.self_attention, config, x, attention_mask)
        x = layer_norm(x + linear(attended, layer.attention_dense), layer.attention_layer_norm, eps)
        inner = act(linear(x, layer.interm_dense))
        x = layer_norm(x + linear(inner, layer.out_dense), layer.out_layer_norm, eps)
    return x, torch.tanh(linear(x[:, 0], model.pooler_dense))


@pytest.mark.parametrize("fused", [True, False])
def test_self_attention_matches_hand_computation(tiny_config, fused):
    attention = perturb(BertSelfAttention(tiny_config, fused=fused)).eval()
    assert tiny_config.head_dim != tiny_config.num_attention_heads  # so sqrt(d) is pinned
    hidden = torch.randn(3, 6, tiny_config.hidden_size)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        got = attention(hidden, extended_attention_mask(mask, hidden.dtype))
        expected = attention_by_hand(attention, tiny_config, hidden, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_extended_attention_mask():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for dtype in (torch.float32, torch.float16):
        ext = extended_attention_mask(mask, dtype)
        assert ext.shape == (2, 1, 1, 3) and ext.dtype == dtype
        low = torch.finfo(dtype).min
        # real tokens exactly 0, padding the dtype's most negative number
        assert ext[:, 0, 0].tolist() == [[0.0, 0.0, low], [0.0, low, low]]
    scores = torch.tensor([[[[2.0, -1.0, 30.0]]], [[[0.5, 40.0, 40.0]]]])
    probs = torch.softmax(scores + extended_attention_mask(mask, torch.float32), dim=-1)
    # padding gets zero weight; the real tokens share it as softmax over them alone
    torch.testing.assert_close(probs[0, 0, 0], torch.tensor([math.exp(3) / (math.exp(3) + 1),
                                                             1 / (math.exp(3) + 1), 0.0]))
    torch.testing.assert_close(probs[1, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_model_matches_hand_computation(tiny_config, fused, act):
    """Embeddings, post-LN layers (with a LayerNorm eps large enough to matter), the
    activation and the pooler tanh(W h_[CLS] + b), all written out here."""
    config = tiny_config.replace(hidden_act=act, layer_norm_eps=0.05)
    model = perturb(BertModel(config, fused_attention=fused)).eval()
    ids, mask = batch(config, [7, 4, 6])
    types = (torch.arange(7)[None, :] >= torch.tensor([[3], [2], [4]])).long() * mask
    with torch.no_grad():
        out = model(ids, mask, types)
        hidden, pooled = bert_by_hand(model, config, ids, mask, types)
    torch.testing.assert_close(out.last_hidden_state, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, rtol=1e-5, atol=1e-5)


def test_activations_match_their_formulas():
    x = torch.linspace(-5, 5, 201, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS["gelu"](x), gelu_erf(x), rtol=0, atol=1e-12)
    for name in ("gelu_new", "gelu_pytorch_tanh"):
        torch.testing.assert_close(ACTIVATIONS[name](x), gelu_tanh(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ACTIVATIONS["relu"](x), x.clamp(min=0), rtol=0, atol=0)
    # the two GELU forms differ by up to ~5e-4 (near |x| = 2.7), far above the tolerance
    assert (gelu_erf(x) - gelu_tanh(x)).abs().max() > 1e-4
    # worked values: GELU(1) = 0.5 (1 + erf(1/sqrt 2)) = 0.5 (1 + 0.682689) = 0.841345
    assert ACTIVATIONS["gelu"](torch.tensor(1.0)).item() == pytest.approx(0.841345, abs=1e-6)


def test_layer_norms_use_the_config_eps(tiny_config):
    model = BertModel(tiny_config.replace(layer_norm_eps=0.25))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1 + 2 * tiny_config.num_hidden_layers
    assert all(norm.eps == 0.25 for norm in norms)


def test_a_state_dict_from_before_the_qkv_fusion_loads(tiny_config):
    """An older run's best.pt holds query/key/value separately: they load, concatenated,
    into qkv; an incomplete set is left for the strict load to refuse, naming it."""
    model = perturb(BertModel(tiny_config))
    old = {}
    for key, tensor in model.state_dict().items():
        if ".qkv." in key:
            for name, block in zip(("query", "key", "value"), tensor.chunk(3)):
                old[key.replace(".qkv.", f".{name}.")] = block.clone()
        else:
            old[key] = tensor
    loaded = BertModel(tiny_config)
    loaded.load_state_dict(old)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    del old["bert_layers.1.self_attention.key.bias"]
    with pytest.raises(RuntimeError, match="bert_layers.1.self_attention.qkv.bias"):
        loaded.load_state_dict(old)
