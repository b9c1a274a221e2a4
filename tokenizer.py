"""The project tokenizer: BERT WordPiece over a checkpoint's `vocab.txt`, through the
`tokenizers` package. Batches are padded to their longest item."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from tokenizers import BertWordPieceTokenizer

from engine.errors import CheckpointError

DEFAULT_MAX_LENGTH = 128
# The white space the tokenizers package trims off the end of each vocab.txt line (Rust's
# char::is_whitespace): str.rstrip() would also take \x1c-\x1f.
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b)))
               + "\u2028\u2029\u202f\u205f\u3000")


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (B, T) int64
    token_type_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 for real tokens

    def to(self, device: torch.device | str) -> "Encoded":
        return Encoded(*(t.to(device, non_blocking=True) for t in
                         (self.input_ids, self.token_type_ids, self.attention_mask)))

    def pin_memory(self) -> "Encoded":
        return Encoded(*(t.pin_memory() for t in
                         (self.input_ids, self.token_type_ids, self.attention_mask)))

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids,
                "attention_mask": self.attention_mask}


def lowercase_of(folder: str) -> bool:
    """A checkpoint's tokenizer_config.json may say do_lower_case; uncased is the default."""
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True


def read_vocab(path: str) -> list[str]:
    """vocab.txt's lines, split as the tokenizers package splits them (on \n alone)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: vocabulary file not found")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text ({err.reason})") from None
    return lines[:-1] if lines[-1] == "" else lines


def vocab_ids(lines: Sequence[str]) -> dict[str, int]:
    """Token -> id as the tokenizers package reads vocab.txt: the line number, trailing white
    space trimmed, a repeated token at its last line."""
    return {line.rstrip(WHITE_SPACE): i for i, line in enumerate(lines)}


class BertTokenizer:
    """Encodes sentences (`[CLS] a [SEP]`) and pairs (`[CLS] a [SEP] b [SEP]`, token types
    0 then 1), truncated to `max_length` (pairs longest-first)."""

    def __init__(self, vocab: str | Sequence[str], lowercase: bool = True,
                 max_length: int = DEFAULT_MAX_LENGTH):
        """`vocab`: a vocab.txt path, or its lines (a checkpoint's own copy, state_dict)."""
        lines = read_vocab(vocab) if isinstance(vocab, str) else list(vocab)
        if max_length < 4:
            raise ValueError(f"max_length must be at least 4, got {max_length}")
        self.max_length, self.lines, self.lowercase = max_length, lines, lowercase
        # Both ways through the same mapping: a saved copy encodes exactly as its folder.
        self._tok = BertWordPieceTokenizer(vocab_ids(lines), lowercase=lowercase)
        self._tok.enable_truncation(max_length, strategy="longest_first")
        self.pad_token_id = self._tok.token_to_id("[PAD]")
        self._tok.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]")

    @classmethod
    def from_pretrained(cls, folder: str,
                        max_length: int = DEFAULT_MAX_LENGTH) -> "BertTokenizer":
        """The tokenizer of a checkpoint folder (callers resolve the folder: the data
        layer never reaches into the model loader)."""
        return cls(os.path.join(folder, "vocab.txt"), lowercase_of(folder), max_length)

    def state_dict(self) -> dict:
        """What the tokenizer needs, for best.pt: it then no longer depends on the folder."""
        return {"vocab": list(self.lines), "lowercase": self.lowercase}

    @classmethod
    def from_state_dict(cls, state: dict, max_length: int = DEFAULT_MAX_LENGTH,
                        source: str = "checkpoint") -> "BertTokenizer":
        vocab = state.get("vocab") if isinstance(state, dict) else None
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise CheckpointError(f"{source}: its saved tokenizer has no vocabulary lines")
        return cls(vocab, bool(state.get("lowercase", True)), max_length)

    def encode(self, texts: Sequence[str],
               pairs: Sequence[str] | None = None) -> Encoded:
        """Batch-encode sentences, or sentence pairs when `pairs` is given."""
        if pairs is None:
            batch = self._tok.encode_batch(list(texts))
        else:
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} first sentences but {len(pairs)} second ones")
            batch = self._tok.encode_batch(list(zip(texts, pairs)))
        return Encoded(
            input_ids=torch.tensor([e.ids for e in batch], dtype=torch.long),
            token_type_ids=torch.tensor([e.type_ids for e in batch], dtype=torch.long),
            attention_mask=torch.tensor([e.attention_mask for e in batch], dtype=torch.long),
        )

    def lengths(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[int]:
        """Token counts (special tokens included, after truncation), for length bucketing."""
        items = list(texts) if pairs is None else list(zip(texts, pairs))
        self._tok.no_padding()
        try:
            return [len(e.ids) for e in self._tok.encode_batch(items)]
        finally:
            self._tok.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]")
