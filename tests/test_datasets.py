import logging
import random
from collections import Counter

import pytest
import torch

from base_bert import default_checkpoint_path
from datasets import (BucketBatchSampler, Collator, DataError, Example, make_loader, read_pairs,
                      read_sentences, subsample)
from engine.specs import PARAPHRASE, SENTIMENT_5, SIMILARITY
from helpers import write_tsv
from tokenizer import BertTokenizer


@pytest.fixture(scope="module")
def tok():
    return BertTokenizer.from_pretrained(default_checkpoint_path(), max_length=32)


def test_reads_sentences(tmp_path):
    path = write_tsv(tmp_path / "sst.csv", ["id", "sentence", "sentiment"],
                     [["a1", " Good film .", 4], ["a2", "Bad .", 0]])
    examples = read_sentences(path, SENTIMENT_5)
    assert [(e.id, e.texts, e.label) for e in examples] == [
        ("a1", ("Good film .",), 4), ("a2", ("Bad .",), 0)]


def test_reads_pairs_with_float_labels(tmp_path):
    path = write_tsv(tmp_path / "sts.csv", ["id", "sentence1", "sentence2", "similarity"],
                     [["s1", "A cat.", "A dog.", "2.4"]])
    (example,) = read_pairs(path, SIMILARITY)
    assert example.texts == ("A cat.", "A dog.") and example.label == pytest.approx(2.4)
    path = write_tsv(tmp_path / "q.csv", ["id", "sentence1", "sentence2", "is_duplicate"],
                     [["q1", "a?", "b?", "1.0"]])
    assert read_pairs(path, PARAPHRASE)[0].label == 1


def test_unlabeled_test_file(tmp_path):
    path = write_tsv(tmp_path / "t.csv", ["id", "sentence"], [["t1", "hello"]])
    assert read_sentences(path)[0].label is None


def test_broken_rows_skipped_with_one_warning(tmp_path, caplog):
    rows = [["q1", "a?", "b?", "0.0"], ["q2", "a?", "", "1.0"], ["q3", "a?", "b?", ""],
            ["q4", "c?", "d?", "1.0"]]
    path = write_tsv(tmp_path / "quora.csv", ["id", "sentence1", "sentence2", "is_duplicate"], rows)
    with caplog.at_level(logging.WARNING):
        examples = read_pairs(path, PARAPHRASE)
    assert [e.id for e in examples] == ["q1", "q4"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "skipped 2 row(s)" in warnings[0] and "line 3, 4" in warnings[0] and path in warnings[0]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.csv: file not found"):
        read_sentences(str(tmp_path / "nothere.csv"), SENTIMENT_5)


def test_missing_column(tmp_path):
    path = write_tsv(tmp_path / "x.csv", ["id", "text", "sentiment"], [["a", "b", 1]])
    with pytest.raises(DataError, match=r"x.csv: missing column\(s\) sentence"):
        read_sentences(path, SENTIMENT_5)


@pytest.mark.parametrize("bad", ["7", "-1", "2.5", "good"])
def test_bad_label_names_file_and_line(tmp_path, bad):
    path = write_tsv(tmp_path / "sst.csv", ["id", "sentence", "sentiment"],
                     [["a", "fine", 1], ["b", "odd", bad]])
    with pytest.raises(DataError, match=r"sst.csv, line 3: bad sentiment label"):
        read_sentences(path, SENTIMENT_5)


def test_similarity_out_of_range(tmp_path):
    path = write_tsv(tmp_path / "sts.csv", ["id", "sentence1", "sentence2", "similarity"],
                     [["s", "a", "b", "5.5"]])
    with pytest.raises(DataError, match="line 2"):
        read_pairs(path, SIMILARITY)


def test_collate_single(tok, tmp_path):
    path = write_tsv(tmp_path / "s.csv", ["id", "sentence", "sentiment"],
                     [["a", "hello world", 1], ["b", "hello", 3]])
    batch = Collator(tok)(read_sentences(path, SENTIMENT_5))
    assert batch.ids == ["a", "b"]
    assert batch.encoded.input_ids.tolist() == [[101, 7592, 2088, 102], [101, 7592, 102, 0]]
    assert batch.labels.dtype == torch.long and batch.labels.tolist() == [1, 3]


def test_collate_pairs_cross_and_bi(tok, tmp_path):
    path = write_tsv(tmp_path / "p.csv", ["id", "sentence1", "sentence2", "similarity"],
                     [["a", "hello world", "hello", "1.5"], ["b", "hello", "world", "4.0"]])
    examples = read_pairs(path, SIMILARITY)
    cross = Collator(tok)(examples)
    assert cross.encoded.input_ids[0].tolist() == [101, 7592, 2088, 102, 7592, 102]
    assert cross.encoded.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert cross.labels.dtype == torch.float32
    bi = Collator(tok, separate=True)(examples)
    assert bi.encoded.input_ids.shape == (4, 4)  # both first sentences, then both seconds
    assert bi.encoded.input_ids[2].tolist() == [101, 7592, 102, 0]
    assert bi.encoded.token_type_ids.sum() == 0


def test_inputs_per_example_counts_a_batch_rows(tok, tmp_path):
    """eval_batches' token budget counts encoder rows: one per sentence or cross-encoded
    pair, two per bi-encoded pair."""
    header = ["id", "sentence1", "sentence2", "similarity"]
    pairs = read_pairs(write_tsv(tmp_path / "p.csv", header,
                                 [["a", "hello world", "hello", "1.5"]] * 3), SIMILARITY)
    single = read_sentences(write_tsv(tmp_path / "s.csv", ["id", "sentence", "sentiment"],
                                      [["a", "hello", 1]] * 3), SENTIMENT_5)
    for collate, examples, inputs in [(Collator(tok), single, 1), (Collator(tok), pairs, 1),
                                      (Collator(tok, separate=True), pairs, 2),
                                      (Collator(tok, separate=True), single, 1)]:
        assert collate.inputs_per_example(examples) == inputs
        assert len(collate(examples).encoded.input_ids) == inputs * len(examples)


def test_bucket_sampler_covers_everything_and_groups_lengths():
    lengths = [i % 17 for i in range(200)]
    sampler = BucketBatchSampler(lengths, batch_size=10, seed=3, chunk_batches=5)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert len(batches) == len(sampler) == 20
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread < 20 * 8  # random batches would spread ~16 each
    assert list(sampler) != batches  # a new order each epoch


def test_eval_loader_keeps_file_order(tok, tmp_path):
    rows = [[f"id{i}", "hello " * (i % 5 + 1), i % 5] for i in range(10)]
    path = write_tsv(tmp_path / "s.csv", ["id", "sentence", "sentiment"], rows)
    loader = make_loader(read_sentences(path, SENTIMENT_5), Collator(tok), 3, shuffle=False)
    assert [i for batch in loader for i in batch.ids] == [f"id{i}" for i in range(10)]


def test_subsample_is_fixed_by_seed(tmp_path):
    items = list(range(100))
    assert subsample(items, 10, 1) == subsample(items, 10, 1)
    assert subsample(items, 10, 2) != subsample(items, 10, 1)  # the seed decides the subset
    picked = subsample(items, 10, 1)
    assert len(set(picked)) == 10 and set(picked) <= set(items)
    assert picked != items[:10]  # random, not the head of the file
    assert subsample(items, 0, 1) == items and subsample(items, 100, 1) == items


def epochs(sampler, n):
    return [list(sampler) for _ in range(n)]


def test_bucket_sampler_every_index_exactly_once_per_epoch():
    lengths = [i % 13 for i in range(205)]
    sampler = BucketBatchSampler(lengths, batch_size=10, seed=0, chunk_batches=4)
    for batches in epochs(sampler, 3):
        assert Counter(i for b in batches for i in b) == Counter(range(205))
        assert len(batches) == len(sampler) == 21  # ceil(205 / 10)
        assert sorted(len(b) for b in batches) == [5] + [10] * 20


def test_bucket_sampler_one_chunk_is_cut_in_length_order_then_shuffled():
    """With one chunk holding everything and distinct lengths, sorting then cutting gives
    the batches of lengths 0-9, 10-19, ...; only their order may change between epochs."""
    lengths = list(range(100))
    random.Random(0).shuffle(lengths)
    sampler = BucketBatchSampler(lengths, batch_size=10, seed=1, chunk_batches=10)
    first, second = epochs(sampler, 2)
    for batches in (first, second):
        as_lengths = [[lengths[i] for i in b] for b in batches]
        assert sorted(as_lengths) == [list(range(10 * k, 10 * k + 10)) for k in range(10)]
    assert first != second  # the batches are shuffled, and anew each epoch
    assert [[lengths[i] for i in b] for b in first] != sorted([lengths[i] for i in b] for b in first)


def test_bucket_sampler_sorts_within_chunks_of_shuffled_indices():
    lengths = [i % 17 for i in range(200)]
    sampler = BucketBatchSampler(lengths, batch_size=10, seed=3, chunk_batches=5)
    for batches in epochs(sampler, 2):
        for b in batches:  # each batch is a run of its chunk's length-sorted indices
            assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
        # chunks are drawn from the shuffled order, not consecutive runs of 50 file rows
        assert any(max(b) - min(b) >= 50 for b in batches)


def test_bucket_sampler_is_fixed_by_seed():
    lengths = [i % 7 for i in range(60)]
    make = lambda seed: BucketBatchSampler(lengths, batch_size=4, seed=seed, chunk_batches=3)
    assert epochs(make(5), 3) == epochs(make(5), 3)
    assert epochs(make(5), 1) != epochs(make(6), 1)


def loader_ids(loader):
    return [i for batch in loader for i in batch.ids]


@pytest.mark.parametrize("bucket", [False, True])
def test_training_loader_shuffles_by_seed(tok, bucket):
    examples = [Example(f"id{i}", ("hello " * (i % 4 + 1),), i % 5) for i in range(20)]
    make = lambda seed: make_loader(examples, Collator(tok), 4, shuffle=True, bucket=bucket,
                                    seed=seed)
    loader = make(0)
    first, second = loader_ids(loader), loader_ids(loader)
    for order in (first, second):
        assert sorted(order) == sorted(e.id for e in examples)  # each example once
    assert first != [e.id for e in examples]  # shuffled
    assert first != second  # anew each epoch
    assert loader_ids(make(0)) == first  # fixed by the seed
    assert loader_ids(make(1)) != first
