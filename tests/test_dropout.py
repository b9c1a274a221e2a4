"""bert.Dropout: inverted dropout with the CPU mask drawn as uniform >= p."""
import math

import pytest
import torch

from bert import Dropout


def test_eval_mode_and_p_zero_return_the_input_itself():
    x = torch.randn(4, 5)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_a_fraction_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(400, 500) + 1.0  # no element is 0 before the dropout
    x.requires_grad_()
    y = Dropout(p).train()(x)
    dropped = y == 0
    n = x.numel()
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # the backward: the upstream gradient through the same mask and scale
    y.backward(torch.ones_like(y))
    assert torch.all(x.grad[dropped] == 0)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / (1 - p)))


def test_the_mask_follows_the_seed():
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    first = Dropout(0.2).train()(x)
    torch.manual_seed(7)
    again = Dropout(0.2).train()(x)
    torch.manual_seed(8)
    other = Dropout(0.2).train()(x)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_bf16_input_stays_bf16_with_the_fp32_rate():
    torch.manual_seed(0)
    x = torch.ones(300, 300, dtype=torch.bfloat16)
    y = Dropout(0.1).train()(x)
    assert y.dtype == torch.bfloat16
    assert abs((y == 0).float().mean().item() - 0.1) < 5 * math.sqrt(0.09 / x.numel())


def test_the_benchmark_swaps_every_dropout_of_the_encoder(tiny_config):
    """bench.dropout's A/B: all of the encoder's dropouts become the other kind, same p."""
    from torch import nn

    from bench.dropout import use
    from bert import BertModel
    tiny_config.hidden_dropout_prob, tiny_config.attention_probs_dropout_prob = 0.2, 0.1
    model = BertModel(tiny_config)
    ours = [m.p for m in model.modules() if isinstance(m, Dropout)]
    # the embeddings' and, per layer, the attention probabilities' and the hidden states' one
    assert len(ours) == 1 + 2 * tiny_config.num_hidden_layers
    use(model, nn.Dropout)
    assert not any(isinstance(m, Dropout) for m in model.modules())
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == ours
