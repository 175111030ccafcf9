"""Data: the TFDS source matches TFDS's tiny_shakespeare, pipelines are deterministic, resumable and
split across processes exactly (tokenizers: tests/test_tokenizer.py)."""

import itertools

import numpy as np
import pytest

from podtrain.data import pipeline, splits, tokenizer
from podtrain.data.config import DataConfig

SPLIT_SIZES = {"train": 1003854, "validation": 55770, "test": 55770}  # TFDS tiny_shakespeare, in characters


@pytest.fixture(scope="module")
def texts(tfds_dir, shakespeare_dir) -> dict[str, str]:
    builder = splits.prepare(DataConfig(data_dir=str(tfds_dir), manual_dir=str(shakespeare_dir)))
    assert builder.name == "tiny_shakespeare" and builder.is_prepared()
    assert builder.info.file_format.value == "array_record"
    return {split: splits.split_text(builder, split) for split in SPLIT_SIZES}


@pytest.fixture(scope="module")
def train_tokens(texts) -> np.ndarray:
    return tokenizer.CharTokenizer.from_texts(texts.values()).encode(texts["train"])


def test_tiny_shakespeare_splits_match_tfds(texts, shakespeare_dir):
    assert {split: len(text) for split, text in texts.items()} == SPLIT_SIZES
    source = (shakespeare_dir / "input.txt").read_text(encoding="utf-8")
    assert texts["train"] + texts["validation"] + texts["test"] == source


def take(dataset, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iter(dataset), n))


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_same_seed_same_batches_different_seed_different(train_tokens):
    first = take(pipeline.train_dataset(pipeline.Windows(train_tokens, 32), 8, seed=3), 4)
    assert_same_batches(take(pipeline.train_dataset(pipeline.Windows(train_tokens, 32), 8, seed=3), 4), first)
    other = take(pipeline.train_dataset(pipeline.Windows(train_tokens, 32), 8, seed=4), 4)
    assert not np.array_equal(other[0]["inputs"], first[0]["inputs"])


def test_batches_are_shuffled_windows_of_the_corpus():
    # Token i is the number i, so every row says which window it is.
    n, seq_len, batch = 203, 10, 8
    tokens = np.arange(n, dtype=np.int32)
    windows = n - seq_len
    batches = take(pipeline.train_dataset(pipeline.Windows(tokens, seq_len), batch, seed=0), windows // batch)
    starts = []
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (batch, seq_len)
        for inputs, targets in zip(b["inputs"], b["targets"]):
            np.testing.assert_array_equal(inputs, np.arange(inputs[0], inputs[0] + seq_len))
            np.testing.assert_array_equal(targets, inputs + 1)
            starts.append(int(inputs[0]))
    assert len(set(starts)) == len(starts), "a window repeats within the first epoch"
    assert set(starts) <= set(range(windows))
    assert starts != sorted(starts), "not shuffled"


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(train_tokens, processes):
    windows = pipeline.Windows(train_tokens, 16)
    global_batches = take(pipeline.train_dataset(windows, 8, seed=5), 3)
    per_process = [take(pipeline.train_dataset(windows, 8, 5, p, processes), 3) for p in range(processes)]
    for step, expected in enumerate(global_batches):
        for key in expected:
            got = np.concatenate([batches[step][key] for batches in per_process])
            np.testing.assert_array_equal(got, expected[key])


def test_iterator_state_resumes_exactly(train_tokens):
    it = iter(pipeline.train_dataset(pipeline.Windows(train_tokens, 16), 4, seed=7))
    take(it, 5)
    state = it.get_state()
    expected = take(it, 4)
    fresh = iter(pipeline.train_dataset(pipeline.Windows(train_tokens, 16), 4, seed=7))
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), expected)
    fresh.set_state(state)  # and again, after having moved on
    assert_same_batches(take(fresh, 4), expected)


def test_eval_batches_are_fixed(train_tokens):
    a = pipeline.eval_batches(pipeline.Windows(train_tokens, 16), 4, num_batches=3, seed=0)
    assert_same_batches(pipeline.eval_batches(pipeline.Windows(train_tokens, 16), 4, num_batches=3, seed=0), a)
    assert len(a) == 3
