import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import BertConfig  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# Tiny models gain nothing from intra-op threads, and lose a lot when a core is busy.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a minute or more on a small CPU (torch.compile); "
                            "`make test` deselects them (-m 'not slow'), `make test-all` runs them")


@pytest.fixture
def tiny_config() -> BertConfig:
    return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


WORDS = ["good", "great", "fine", "bad", "awful", "movie", "film", "the", "a", "is", "was",
         "what", "how", "do", "i", "cook", "rice", "learn", "piano", "cat", "dog", "sits",
         "runs", "man", "plays", "guitar", "woman", "sings", "?", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny random BERT in HF format, with a vocabulary of the test sentences' words."""
    from bert import BertModel
    from helpers import to_hf_state_dict, write_checkpoint
    vocab = SPECIAL + WORDS
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("tiny_bert"), config,
                            to_hf_state_dict(BertModel(config)), vocab=vocab)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """Small files in the starter layout whose labels the words determine."""
    from helpers import write_tiny_data
    return write_tiny_data(tmp_path_factory.mktemp("data"))
