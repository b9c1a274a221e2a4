"""A hand-written BERT encoder (Devlin et al., 2019), as in the report's section 4.1.

Build, then load: constructors only create randomly initialised modules; weights come
from `base_bert.load_pretrained` / `base_bert.from_pretrained`. This file does no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from config import BertConfig

ACTIVATIONS = {
    "gelu": nn.GELU(),  # BERT's exact erf form
    "relu": nn.ReLU(),
    "gelu_new": nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": nn.GELU(approximate="tanh"),
}


class Dropout(nn.Module):
    """Inverted dropout, as nn.Dropout: in training each element is zeroed with probability
    p and the rest scaled by 1 / (1 - p). On a CPU the mask is uniform(0, 1) >= p, drawn in
    fp32 whatever the input's dtype (a bf16 draw would round p): torch's bernoulli_ takes
    longer there (forward + backward on a step's (676, 384) hidden states, 2-core EPYC:
    2.1 against 1.4 ms). Elsewhere F.dropout (fused on CUDA). Either way other random draws
    than nn.Dropout's, with the same distribution."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= self.p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # (B, T, H)
    pooler_output: torch.Tensor  # (B, H)


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 mask -> (B, 1, 1, T) additive mask: 0 for real tokens, a large negative
    number for padding, so that softmax gives padding (almost exactly) zero weight."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (report section 4.1.1):
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + mask) V, per head, heads concatenated."""

    def __init__(self, config: BertConfig, fused: bool = True):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # Q, K and V from one (H -> 3H) projection: one GEMM per layer instead of three. Its
        # weight's rows (output features) are query's, key's, value's, in that order: the
        # order in which base_bert's name map concatenates (and export splits) HF's tensors.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.dropout = Dropout(config.attention_probs_dropout_prob)
        # fused=True uses torch's scaled_dot_product_attention; False the explicit form below.
        self.fused = fused
        self.register_load_state_dict_pre_hook(fuse_separate_qkv)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # (B, T, H) -> (B, heads, T, head_dim)
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, heads, T, T)
        probs = self.dropout(torch.softmax(scores + mask, dim=-1))
        return probs @ v  # (B, heads, T, head_dim)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)  # (B, T, 3H) -> 3 x (B, T, H) views
        return self.attend(q, k, v, mask)

    def forward_packed(self, hidden: torch.Tensor, packing: "Packing") -> torch.Tensor:
        """(N, H) real tokens -> (N, H): the projections on the packed rows, attention per
        sequence in the padded layout."""
        q, k, v = packing.unpack(self.qkv(hidden)).chunk(3, dim=-1)  # (N, 3H) -> 3 x (S, T, H)
        return packing.pack(self.attend(q, k, v, packing.mask))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Projected (B, T, H) queries, keys, values -> the heads' concatenated context."""
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        if self.fused:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        else:
            context = self.explicit_attention(q, k, v, mask)
        batch, _, length, _ = context.shape
        # (B, heads, T, head_dim) -> (B, T, H)
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)


def fuse_separate_qkv(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """A state dict saved before Q, K and V were fused (an older run's best.pt) holds
    query/key/value separately: concatenate them (exactly) into qkv so that it still
    loads. Only a complete set is fused; anything else is left for the strict load to name.
    `state_dict` is load_state_dict's own copy, not the caller's."""
    for param in ("weight", "bias"):
        parts = [f"{prefix}{name}.{param}" for name in ("query", "key", "value")]
        fused = f"{prefix}qkv.{param}"
        if fused not in state_dict and all(part in state_dict for part in parts):
            state_dict[fused] = torch.cat([state_dict.pop(part) for part in parts])


class BertLayer(nn.Module):
    """Attention, add & norm, feed-forward, add & norm (post-LN, as in the original BERT)."""

    def __init__(self, config: BertConfig, fused: bool = True):
        super().__init__()
        self.self_attention = BertSelfAttention(config, fused)
        self.attention_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.interm_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.interm_af = ACTIVATIONS[config.hidden_act]
        self.out_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.out_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def add_norm(self, residual: torch.Tensor, sublayer_out: torch.Tensor, dense: nn.Linear,
                 norm: nn.LayerNorm) -> torch.Tensor:
        return norm(residual + self.dropout(dense(sublayer_out)))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(hidden, self.self_attention(hidden, mask))

    def forward_packed(self, hidden: torch.Tensor, packing: "Packing") -> torch.Tensor:
        """The layer on the (N, H) real tokens of packed sequences."""
        return self.feed_forward(hidden, self.self_attention.forward_packed(hidden, packing))

    def feed_forward(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Add & norm the attention's output, then the feed-forward: token-wise."""
        hidden = self.add_norm(hidden, attended, self.attention_dense, self.attention_layer_norm)
        interm = self.interm_af(self.interm_dense(hidden))  # (B, T, intermediate)
        return self.add_norm(hidden, interm, self.out_dense, self.out_layer_norm)


class BertModel(nn.Module):
    """Embeddings (word + position + token type, LayerNorm, dropout), the layer stack, and
    the pooler tanh(W h_[CLS] + b)."""

    def __init__(self, config: BertConfig, fused_attention: bool = True):
        super().__init__()
        self.config = config
        self.word_embedding = nn.Embedding(config.vocab_size, config.hidden_size,
                                           padding_idx=config.pad_token_id)
        self.pos_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.tk_type_embedding = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids",
                             torch.arange(config.max_position_embeddings)[None, :],
                             persistent=False)
        self.bert_layers = nn.ModuleList(
            [BertLayer(config, fused_attention) for _ in range(config.num_hidden_layers)])
        self.pooler_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.init_weights()

    def init_weights(self) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit norms."""
        self.apply(lambda module: init_module(module, self.config.initializer_range))

    def set_fused_attention(self, fused: bool) -> None:
        for layer in self.bert_layers:
            layer.self_attention.fused = fused

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embedded = (self.word_embedding(input_ids)
                    + self.pos_embedding(self.position_ids[:, :length])
                    + self.tk_type_embedding(token_type_ids))  # (B, T, H)
        return self.embed_dropout(self.embed_layer_norm(embedded))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BertOutput:
        hidden = self.embed(input_ids, token_type_ids)  # (B, T, H)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = extended_attention_mask(attention_mask, hidden.dtype)  # (B, 1, 1, T)
        for layer in self.bert_layers:
            hidden = layer(hidden, mask)
        pooled = torch.tanh(self.pooler_dense(hidden[:, 0]))  # (B, H)
        return BertOutput(last_hidden_state=hidden, pooler_output=pooled)

    def forward_many(self, batches: list) -> list[BertOutput]:
        """`forward` on each of several padded batches (tokenizer.Encoded), in one pass:
        the token-wise layers (embeddings, projections, feed-forward, LayerNorm) run on one
        (real tokens, H) matrix of all the batches' sequences, so that their matrix
        products see every token of the step at once and none of the padding; attention
        runs per sequence in a padded layout. Equal to `forward` per batch up to float
        reassociation (same dropout probabilities, different random draws)."""
        packing = Packing.of(batches)
        if packing.length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {packing.length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        embedded = (self.word_embedding(packing.pack(packing.input_ids))
                    + self.pos_embedding(packing.index % packing.length)
                    + self.tk_type_embedding(packing.pack(packing.token_type_ids)))  # (N, H)
        hidden = self.embed_dropout(self.embed_layer_norm(embedded))
        packing.mask = extended_attention_mask(packing.attention_mask, hidden.dtype)
        for layer in self.bert_layers:
            hidden = layer.forward_packed(hidden, packing)
        padded = packing.unpack(hidden)  # (S, T, H), zeros at the padding
        pooled = torch.tanh(self.pooler_dense(padded[:, 0]))  # (S, H)
        return [BertOutput(last_hidden_state=padded[start:end, :length],
                           pooler_output=pooled[start:end])
                for start, end, length in packing.spans]


@dataclass
class Packing:
    """Several padded batches as one: their S sequences stacked and padded to the longest
    (T), and `index`, the positions of the N real tokens in that (S * T) layout. pack takes
    a (S, T, ...) tensor to its (N, ...) real tokens, unpack the way back (zeros at the
    padding). `spans`: each batch's (first row, end row, own length)."""
    input_ids: torch.Tensor  # (S, T)
    token_type_ids: torch.Tensor  # (S, T)
    attention_mask: torch.Tensor  # (S, T)
    index: torch.Tensor  # (N,)
    spans: list[tuple[int, int, int]]
    mask: torch.Tensor | None = None  # (S, 1, 1, T) additive, set by the encoder

    @classmethod
    def of(cls, batches: list) -> "Packing":
        length = max(b.input_ids.shape[1] for b in batches)
        stacked = [torch.cat([F.pad(getattr(b, name), (0, length - b.input_ids.shape[1]))
                              for b in batches])
                   for name in ("input_ids", "token_type_ids", "attention_mask")]
        ends = list(accumulate(len(b.input_ids) for b in batches))
        spans = [(end - len(b.input_ids), end, b.input_ids.shape[1]) for b, end in zip(batches, ends)]
        index = stacked[2].flatten().nonzero().squeeze(1)
        return cls(*stacked, index, spans)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def token_spans(self) -> list[tuple[int, int]]:
        """Each batch's (first, end) row among the N packed tokens: one contiguous block
        per batch, since the batches are stacked in order and `index` is sorted."""
        starts = torch.tensor([start for start, _, _ in self.spans] + [len(self.input_ids)],
                              device=self.index.device)
        cuts = torch.searchsorted(self.index, starts * self.length).tolist()
        return list(zip(cuts[:-1], cuts[1:]))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.flatten(0, 1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        rows = len(self.input_ids) * self.length
        # in place into the fresh zeros: index_copy would first clone them (a (S * T, 3H)
        # copy per layer); autograd gives `packed` the same gradient either way
        full = packed.new_zeros((rows,) + packed.shape[1:]).index_copy_(0, self.index, packed)
        return full.view(len(self.input_ids), self.length, *packed.shape[1:])


def init_module(module: nn.Module, std: float) -> None:
    """Initialise one module the way BERT does; also used for fresh task heads."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real (non-padding) tokens: (B, T, H) -> (B, H)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
