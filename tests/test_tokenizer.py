import os

import pytest
import torch

from base_bert import default_checkpoint_path
from engine.errors import CheckpointError
from tokenizer import BertTokenizer


@pytest.fixture(scope="module")
def tok():
    return BertTokenizer.from_pretrained(default_checkpoint_path(), max_length=16)


def test_hello_world(tok):
    enc = tok.encode(["hello world"])
    assert enc.input_ids.tolist() == [[101, 7592, 2088, 102]]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 1]]


def test_lowercases(tok):
    assert tok.encode(["HELLO World"]).input_ids.tolist() == [[101, 7592, 2088, 102]]


def test_pair_token_types(tok):
    enc = tok.encode(["hello world"], ["hello"])
    assert enc.input_ids.tolist() == [[101, 7592, 2088, 102, 7592, 102]]
    assert enc.token_type_ids.tolist() == [[0, 0, 0, 0, 1, 1]]


def test_padding_to_longest(tok):
    enc = tok.encode(["hello", "hello world hello"])
    assert enc.input_ids.shape == (2, 5)
    assert enc.input_ids[0].tolist() == [101, 7592, 102, 0, 0]
    assert enc.attention_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert enc.input_ids.dtype == enc.attention_mask.dtype == enc.token_type_ids.dtype


def test_truncation_single_and_pair(tok):
    long = "hello " * 40
    enc = tok.encode([long])
    assert enc.input_ids.shape[1] == 16 and enc.input_ids[0, -1].item() == 102
    pair = tok.encode([long], ["world world"])
    ids = pair.input_ids[0].tolist()
    assert len(ids) == 16
    # longest-first: the short second sentence survives whole
    assert ids[-3:] == [2088, 2088, 102]
    assert pair.token_type_ids[0].tolist().count(1) == 3


def test_lengths(tok):
    assert tok.lengths(["hello world", "hello " * 40]) == [4, 16]
    assert tok.encode(["a", "hello world"]).input_ids.shape == (2, 4)  # padding restored


def test_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="vocab"):
        BertTokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(ValueError, match="second"):
        BertTokenizer.from_pretrained(default_checkpoint_path()).encode(["a", "b"], ["c"])


def test_pair_batch_token_types_and_mask(tok):
    # [CLS] hello world hello [SEP] world [SEP]  /  [CLS] hello [SEP] world hello world [SEP]
    enc = tok.encode(["hello world hello", "hello"], ["world", "world hello world"])
    assert enc.input_ids.tolist() == [[101, 7592, 2088, 7592, 102, 2088, 102],
                                      [101, 7592, 102, 2088, 7592, 2088, 102]]
    # 0 for [CLS], the first segment and its [SEP]; 1 for the second segment and its [SEP]
    assert enc.token_type_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    assert enc.attention_mask.tolist() == [[1] * 7, [1] * 7]
    padded = tok.encode(["hello", "hello world hello"], ["world", "world"])
    # [CLS] hello [SEP] world [SEP] + 2 padding: padding has type 0 and mask 0
    assert padded.token_type_ids[0].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert padded.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert padded.input_ids[0, -2:].tolist() == [0, 0]
    single = tok.encode(["hello world", "hello"])
    assert single.token_type_ids.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]


def test_encoded_to_and_as_kwargs_keep_the_fields(tok):
    enc = tok.encode(["hello"], ["world world"])
    moved = enc.to("cpu")
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(getattr(moved, name), getattr(enc, name))
        assert torch.equal(enc.as_kwargs()[name], getattr(enc, name))


# Lines the tokenizers package reads its own way: trailing (Unicode) white space trimmed, but
# not \x1c; a lone \r inside a line; \r\n; an empty line; a token twice (the later id wins).
TRICKY_VOCAB = ("[PAD]\n[UNK]\r\n[CLS]\n[SEP]\n[MASK]\nthe\nmovie  \nis\t\ngreat\u3000\n\x1cx\x1c\n"
                "a\rb\n\nfilm\n##s\nthe\nGREAT\n\u200bzero\nlast")


def vocab_folder(tmp_path, name, lowercase):
    import json
    import shutil
    if name == "packaged":
        folder = shutil.copytree(default_checkpoint_path(), tmp_path / "packaged")
    else:
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "vocab.txt", "w", encoding="utf-8", newline="") as f:
            f.write(TRICKY_VOCAB)
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({"do_lower_case": lowercase}, f)
    return str(folder)


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
@pytest.mark.parametrize("vocab", ["packaged", "tricky"])
def test_a_saved_tokenizer_gives_the_ids_of_its_folder(tmp_path, vocab, lowercase):
    """best.pt keeps the tokenizer's state (vocabulary lines, lower-casing): rebuilt from it,
    with the folder gone, it encodes exactly as the folder's vocab.txt read by tokenizers."""
    import shutil
    from tokenizers import BertWordPieceTokenizer
    folder = vocab_folder(tmp_path, vocab, lowercase)
    texts = ["the movie is great", "The movies GREAT", "\x1cx\x1c a\rb zero", "last film", "",
             "hello world, how are you?", "Ünïcödé   spaces\u3000and\ttabs"]
    pairs = ["is the film", "great great", "the", "GREAT", "movie", "hello", "x"]
    reference = BertWordPieceTokenizer(os.path.join(folder, "vocab.txt"), lowercase=lowercase)
    reference.enable_truncation(12, strategy="longest_first")
    reference.enable_padding(pad_id=reference.token_to_id("[PAD]"), pad_token="[PAD]")
    from_folder = BertTokenizer.from_pretrained(folder, max_length=12)
    state = from_folder.state_dict()
    assert state["lowercase"] is lowercase
    shutil.rmtree(folder)
    from_state = BertTokenizer.from_state_dict(state, max_length=12)
    for args in ((texts,), (texts, pairs)):
        expected = reference.encode_batch(list(zip(*args)) if len(args) == 2 else texts)
        for tok in (from_folder, from_state):
            enc = tok.encode(*args)
            assert enc.input_ids.tolist() == [e.ids for e in expected]
            assert enc.token_type_ids.tolist() == [e.type_ids for e in expected]
            assert enc.attention_mask.tolist() == [e.attention_mask for e in expected]
