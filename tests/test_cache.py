"""Pre-tokenized caches (data/cache.py): training reads them instead of the sources and sees
identical batches; a cache is used only for its exact key, a named one of another tokenizer is
refused, and an interrupted prepare leaves nothing that looks like a cache."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from podtrain.data import cache, pipeline, sources, tokenizer
from podtrain.data.sources import DataError
from podtrain.train import loop

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "sleeps"]


@pytest.fixture
def corpus(tmp_path):
    """Two sources: five small JSONL files (a unit each) and a .txt file of three units."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(5):
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(1, 30)))) + "\n"}) for _ in range(25)]
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    line = " ".join(WORDS) + "\n"
    (folder / "book.txt").write_text(line * (2 * sources.UNIT_BYTES // len(line) + 9))  # three units
    return folder


def mixture(folder) -> str:
    return f"data.mixture=[{{dataset: '{folder}/part-*.jsonl', weight: 2}}, {{dataset: '{folder}/book.txt'}}]"


def same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_training_reads_the_cache_and_sees_identical_batches(tiny_config, corpus, tmp_path, monkeypatch):
    cfg = tiny_config(mixture(corpus), "data.tokenizer=char", "data.holdout=0.2", f"data.cache={tmp_path / 'cache'}")
    made = cache.prepare(cfg.data)
    assert [c.written for c in made] == [True] * 4  # two sources, each its training and held-out documents
    assert [c.written for c in cache.prepare(cfg.data)] == [False] * 4

    plain = tiny_config(mixture(corpus), "data.tokenizer=char", "data.holdout=0.2", f"data.cache={tmp_path / 'none'}")
    tok, from_source, val, nbytes = loop.load_data(plain)
    assert all(x.cache is None for x in from_source.read.ins)
    expected = list(itertools.islice(from_source, 40))
    from_source.close()

    tok_c, from_cache, val_c, nbytes_c = loop.load_data(cfg)
    assert tok_c == tok and all(x.cache is not None for x in from_cache.read.ins)
    train_in, val_in = cache.attach(list(pipeline.inputs(cfg.data)), tok, cfg.data)

    def unread(self, unit):
        raise AssertionError(f"{self.name} was read although its cache is there")

    monkeypatch.setattr(sources.JsonlFiles, "read", unread)
    monkeypatch.setattr(sources.TextFiles, "read", unread)
    same(list(itertools.islice(from_cache, 40)), expected)
    from_cache.close()
    same(val_c, val)
    assert nbytes_c == nbytes
    cached_val = pipeline.eval_batches(val_in, tok, cfg.data.seq_len, cfg.train.batch_size, 2, cfg.train.seed)
    same(cached_val[0], val)  # read from the held-out caches, the sources patched away


def test_prepare_in_worker_processes_writes_the_same_cache(tiny_config, corpus, tmp_path):
    def prepared(workers: int) -> tuple[dict, list[dict]]:
        cfg = tiny_config(
            f"data.dataset={corpus}/part-*.jsonl", "data.tokenizer=byte", "data.validation=" + str(corpus / "book.txt"),
            f"data.workers={workers}", f"data.cache={tmp_path / f'cache{workers}'}",
        )  # fmt: skip
        c = cache.open_cache(cache.epath.Path(cache.prepare(cfg.data)[0].folder))
        return c.meta, [c.read(u) for u in range(c.meta["source"]["units"])]

    meta0, units0 = prepared(0)
    meta1, units1 = prepared(1)
    assert meta0 == meta1 and meta0["source"]["units"] == 5
    same(units0, units1)
    tok = tokenizer.ByteTokenizer()
    for u, docs in enumerate(units0):
        records = sources.open_source(f"{corpus}/part-*.jsonl", "train", None).read(u)
        same([docs], [pipeline.documents(tok, records, "text", "")])


def test_a_cache_of_another_tokenizer_is_refused_when_named_and_left_alone_beside(
    tiny_config, corpus, tmp_path, capsys
):
    root = tmp_path / "cache"
    glob = f"data.dataset={corpus}/part-*.jsonl"
    byte_cfg = tiny_config(glob, "data.tokenizer=byte", f"data.cache={root}")
    folders = [c.folder for c in cache.prepare(byte_cfg.data)]
    byte_fp = tokenizer.ByteTokenizer().fingerprint

    char_cfg = tiny_config(glob, "data.tokenizer=char", f"data.cache={root}")
    train_in, val_in = pipeline.inputs(char_cfg.data)
    char = tokenizer.from_config("char", lambda: pipeline.texts(train_in))
    attached = cache.attach([train_in, val_in], char, char_cfg.data)
    assert all(x.cache is None for group in attached for x in group)  # read from the source, not from byte's
    note = capsys.readouterr().out
    assert "is read from its files" in note and byte_fp[:16] in note and char.fingerprint[:16] in note

    pinned = tiny_config(glob, "data.tokenizer=char", f"data.cache={folders[0]}")
    with pytest.raises(DataError) as e:
        cache.attach([train_in, val_in], char, pinned.data)
    message = str(e.value)
    assert f"data.cache={folders[0]}" in message and "podtrain data prepare" in message
    assert byte_fp[:16] in message and char.fingerprint[:16] in message and "\n" not in message

    other = tiny_config(f"data.dataset={corpus}/book.txt", "data.tokenizer=byte", f"data.cache={folders[0]}")
    train_b, val_b = pipeline.inputs(other.data)
    with pytest.raises(DataError, match="which this run does not read"):
        cache.attach([train_b, val_b], tokenizer.ByteTokenizer(), other.data)

    same_tok = tiny_config(glob, "data.tokenizer=byte", f"data.cache={folders[0]}")
    train_c, val_c = cache.attach(list(pipeline.inputs(same_tok.data)), tokenizer.ByteTokenizer(), same_tok.data)
    assert train_c[0].cache is not None and val_c[0].cache is None  # a named cache serves its own key only


def test_an_interrupted_prepare_leaves_nothing_that_looks_like_a_cache(tiny_config, corpus, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    cfg = tiny_config(f"data.dataset={corpus}/part-*.jsonl", "data.tokenizer=byte", f"data.cache={root}")
    encode = cache._Encode.__call__

    def dies_at_unit_3(self, unit):
        if int(unit) == 3:
            raise RuntimeError("killed")
        return encode(self, unit)

    monkeypatch.setattr(cache._Encode, "__call__", dies_at_unit_3)
    with pytest.raises(RuntimeError, match="killed"):
        cache.prepare(cfg.data)
    assert not root.exists()
    monkeypatch.setattr(cache._Encode, "__call__", encode)

    key = cache.epath.Path(cache.prepare(cfg.data)[0].folder)
    tok = tokenizer.ByteTokenizer()
    # kill -9 before the rename: a complete-looking folder under a .tmp- name is never read
    os.rename(key, root / f".tmp-{key.name}-dead")
    (train,), _ = cache.attach(list(pipeline.inputs(cfg.data)), tok, cfg.data)
    assert train.cache is None

    # a cache missing units (copied in part) is refused, naming the folder and the fix
    key.mkdir()
    (key / cache.META).write_text((root / f".tmp-{key.name}-dead" / cache.META).read_text())
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(os.fspath(key / cache.UNITS), "group_size:1")
    writer.write(b"x")
    writer.close()
    with pytest.raises(DataError, match=f"holds 1 units of 5: delete {key}"):
        cache.attach(list(pipeline.inputs(cfg.data)), tok, cfg.data)


def test_data_prepare_command_writes_what_training_reads(tiny_config, corpus, tmp_path):
    from podtrain.train import config as configs

    cfg = tiny_config(f"data.dataset={corpus}/part-*.jsonl", "data.tokenizer=byte", f"data.cache={tmp_path / 'c'}")
    path = tmp_path / "prepare.yaml"
    path.write_text(configs.dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "podtrain.launch.cli", "data", "prepare", "--config", str(path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"wrote {tmp_path / 'c'}/") for line in lines), lines
    _, batches, _, _ = loop.load_data(cfg)
    assert batches.read.ins[0].cache.folder == lines[0].split()[1].rstrip(":")
    batches.close()
