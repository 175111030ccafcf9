"""Sources: every format's units read back exactly the records written, each once and in order,
whatever the unit size; sources pickle into worker processes; bad data is one DataError line that
names the file and where in it."""

import gzip
import json
import os
import pickle
import random

import numpy as np
import pytest
import tensorflow_datasets as tfds

from podtrain.data import DatasetUnavailable, sources
from podtrain.data.config import DataConfig
from podtrain.data.sources import DataError, open_source, record_text
from podtrain.train import config as configs
from podtrain.train.config import ConfigError

CFG = DataConfig()


def all_records(source) -> list[dict]:
    """Every unit's records in unit order, without our `_where` (checked on its own)."""
    return [{k: v for k, v in r.items() if k != "_where"} for u in range(len(source)) for r in source.read(u)]


def random_texts(n: int, seed: int = 0, long_every: int = 0) -> list[str]:
    """Lines of random length (multi-byte characters too); every `long_every`-th one is longer than a unit."""
    rng = random.Random(seed)
    alphabet = 'abcdefghij klmnopé—ü😀\t"\\'
    out = []
    for i in range(n):
        size = 300_000 if long_every and i % long_every == long_every - 1 else rng.randrange(0, 3000)
        out.append("".join(rng.choice(alphabet) for _ in range(size)) if size < 5000 else "z" * size)
    return out


def write_jsonl(path, rows: list[dict], blank_every: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if blank_every and i % blank_every == 0:
                f.write("\n")


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert isinstance(excinfo.value, DatasetUnavailable)
    return message


# --- JSONL ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """~1.3 MB over two files: several units each, random line lengths, one line longer than a unit."""
    folder = tmp_path_factory.mktemp("jsonl")
    texts = random_texts(900, long_every=450)
    rows = [{"text": t, "i": i} for i, t in enumerate(texts)]
    write_jsonl(folder / "a.jsonl", rows[:600], blank_every=97)
    write_jsonl(folder / "b.jsonl", rows[600:])
    return folder, rows


def test_jsonl_units_read_every_line_once_in_order(big_jsonl):
    folder, rows = big_jsonl
    source = open_source(f"{folder}/*.jsonl", "train", CFG)
    sizes = [os.path.getsize(folder / n) for n in ("a.jsonl", "b.jsonl")]
    assert sizes[0] > 3 * sources.UNIT_BYTES and len(source) == sum(-(-s // sources.UNIT_BYTES) for s in sizes)
    assert all_records(source) == rows
    assert any(source.read(u) == [] for u in range(len(source)))  # the long line covers a whole unit


def test_jsonl_unit_boundaries_at_every_byte(tmp_path):
    """A line belongs to the unit it starts in, for every unit size: boundaries on newlines, inside
    lines, inside multi-byte characters, on blank lines, and lines longer than a unit."""
    rows = [{"text": t} for t in ["", "é😀", "a" * 40, "b", "", "ccc", "\n", "d" * 3]]
    write_jsonl(tmp_path / "x.jsonl", rows, blank_every=3)
    size = os.path.getsize(tmp_path / "x.jsonl")
    for unit_bytes in range(1, size + 2):
        source = open_source(str(tmp_path / "x.jsonl"), "train", CFG, unit_bytes=unit_bytes)
        assert len(source) == -(-size // unit_bytes)
        assert all_records(source) == rows, unit_bytes


def test_jsonl_records_say_their_file_and_line(big_jsonl):
    folder, rows = big_jsonl
    source = open_source(str(folder / "a.jsonl"), "train", CFG)
    lines = (folder / "a.jsonl").read_text(encoding="utf-8").split("\n")
    last = source.read(len(source) - 1)[-1]
    line = int(sources.locate(last["_where"]).rsplit(":", 1)[1])
    assert json.loads(lines[line - 1]) == {k: v for k, v in last.items() if k != "_where"}
    assert sources.locate(last["_where"]) == f"{folder / 'a.jsonl'}:{line}"


def test_jsonl_gz_one_unit_per_file(tmp_path):
    rows = [{"text": t, "n": i} for i, t in enumerate(random_texts(40))]
    for name, part in (("p0.jsonl.gz", rows[:25]), ("p1.jsonl.gz", rows[25:])):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    source = open_source(f"{tmp_path}/p*.jsonl.gz", "train", CFG)
    assert len(source) == 2 and all_records(source) == rows
    assert source.read(1)[2]["_where"] == f"{tmp_path / 'p1.jsonl.gz'}:3"


# --- Plain text -------------------------------------------------------------------------------


def test_txt_pieces_concatenate_to_each_file(tmp_path):
    texts = ["\n".join(random_texts(500, seed=1)) + "\n", "one line, no newline", ""]
    for name, text in zip(("a.txt", "b.txt", "c.txt"), texts):
        (tmp_path / name).write_text(text, encoding="utf-8")
    source = open_source(f"{tmp_path}/*.txt", "train", CFG)
    pieces = all_records(source)
    assert len(source) > 4 and len(pieces) == len(source) - 1  # the empty file is one empty unit
    docs, current = [], ""
    for piece in pieces:
        current += piece["text"]
        if piece.get("_end", True):
            assert "_end" not in piece  # only pieces that are not a document's last carry _end
            docs.append(current)
            current = ""
        else:
            assert piece["text"].endswith("\n") or piece["text"] == ""  # split at line ends
    assert docs == texts[:2] and current == ""


def test_txt_unit_boundaries_at_every_byte(tmp_path):
    text = "ab\n\né😀\n" + "x" * 30 + "\nlast"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    for unit_bytes in range(1, len(text.encode()) + 2):
        pieces = all_records(open_source(str(tmp_path / "t.txt"), "train", CFG, unit_bytes=unit_bytes))
        assert "".join(p["text"] for p in pieces) == text, unit_bytes
        assert [p.get("_end", True) for p in pieces] == [False] * (len(pieces) - 1) + [True]


# --- Parquet and ArrayRecord ------------------------------------------------------------------


def test_parquet_one_unit_per_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "id": i, "raw": t.encode()} for i, t in enumerate(random_texts(50, seed=2))]
    pq.write_table(pa.Table.from_pylist(rows[:30]), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(rows[30:]), tmp_path / "b.parquet", row_group_size=100)
    source = open_source(f"{tmp_path}/*.parquet", "train", CFG)
    assert len(source) == 5 + 1
    # Binary columns that are UTF-8 come back as text, like TFDS Text features.
    assert all_records(source) == [dict(r, raw=r["text"]) for r in rows]
    assert source.read(4)[1]["_where"] == f"{tmp_path / 'a.parquet'}: row 29"


def write_array_record(path, records: list[bytes]) -> None:
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()


def test_array_record_json_and_text_records_in_units_of_about_256_kib(tmp_path):
    texts = random_texts(800, seed=3)
    records = [json.dumps({"text": t, "k": i}).encode() if i % 3 else t.encode() for i, t in enumerate(texts)]
    records[1] = b"{{Infobox person}} is wikitext, not JSON"
    write_array_record(tmp_path / "d-0.array_record", records[:500])
    write_array_record(tmp_path / "d-1.array_record", records[500:])
    source = open_source(f"{tmp_path}/d-*.array_record", "train", CFG)
    expected = [json.loads(r) if r.startswith(b'{"') else {"text": r.decode()} for r in records]
    assert all_records(source) == expected
    size = os.path.getsize(tmp_path / "d-0.array_record")
    assert source.per_unit[0] == round(sources.UNIT_BYTES * 500 / size)
    assert len(source) == -(-500 // source.per_unit[0]) + -(-300 // source.per_unit[1]) and len(source) > 2


# --- TFDS and tiny_shakespeare ----------------------------------------------------------------


class TinyDocs(tfds.core.GeneratorBasedBuilder):
    """Registered as tiny_docs: what any TFDS text dataset looks like to a source."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"body": tfds.features.Text(), "n": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 300), "test": self._generate_examples(300, 320)}

    def _generate_examples(self, a, b):
        for i in range(a, b):
            yield i, {"body": f"document {i} " + "w" * (i * 37 % 2000), "n": i}


@pytest.fixture(scope="module")
def tiny_docs_dir(tmp_path_factory):
    cfg = DataConfig(dataset="tfds:tiny_docs", data_dir=str(tmp_path_factory.mktemp("tfds_docs")))
    sources.prepare("tfds:tiny_docs", cfg)
    return cfg


def test_tfds_source_reads_a_split_in_record_ranges(tiny_docs_dir):
    source = open_source("tfds:tiny_docs", "train", tiny_docs_dir, unit_bytes=16 * 1024)
    records = all_records(source)
    assert len(source) > 3 and sorted(r["n"] for r in records) == list(range(300))
    assert all(r["body"] == f"document {r['n']} " + "w" * (r["n"] * 37 % 2000) for r in records)
    assert record_text(records[0], "body", "x") == records[0]["body"]
    test = open_source("tfds:tiny_docs", "test", tiny_docs_dir)
    assert len(test) == 1 and len(test.read(0)) == 20
    assert test.fingerprint != source.fingerprint


def test_tiny_shakespeare_is_one_record_per_speech(tfds_dir, shakespeare_dir):
    cfg = DataConfig(data_dir=str(tfds_dir), manual_dir=str(shakespeare_dir))
    text = (shakespeare_dir / "input.txt").read_text(encoding="utf-8")
    i = int(len(text) * 0.9)
    j = i + int((len(text) - i) * 0.5)
    for split, part in (("train", text[:i]), ("validation", text[i:j]), ("test", text[j:])):
        source = open_source("tiny_shakespeare", split, cfg)
        speeches = [r["text"] for r in all_records(source)]
        assert "\n\n".join(speeches) == part and all("\n\n" not in s for s in speeches)
    train = open_source("tiny_shakespeare", "train", cfg)
    assert len(train) == -(-train.records // train.per_unit) and 4 <= len(train) <= 5  # ~1.1 MB stored


def test_tfds_errors_name_the_dataset_and_the_fix(tiny_docs_dir, tmp_path):
    with pytest.raises(DataError) as e:
        open_source("tfds:tiny_shakespere", "train", CFG)
    assert "did you mean tfds:tiny_shakespeare" in one_line_error(e)
    with pytest.raises(DataError) as e:
        open_source("tfds:tiny_docs", "validation", tiny_docs_dir)
    assert "no split 'validation' (splits: test, train)" in one_line_error(e)
    with pytest.raises(DataError) as e:
        open_source("tfds:tiny_docs", "train", DataConfig(data_dir=str(tmp_path)))
    assert f"tfds build tiny_docs --data_dir {tmp_path}" in one_line_error(e)


# --- Sources in other processes ---------------------------------------------------------------


def test_sources_pickle_without_open_files_and_read_the_same(big_jsonl, tiny_docs_dir, tmp_path):
    folder, _ = big_jsonl
    write_array_record(tmp_path / "r.array_record", [b"one", b"two"])
    for source in (
        open_source(f"{folder}/*.jsonl", "train", CFG),
        open_source(str(tmp_path / "r.array_record"), "train", CFG),
        open_source("tfds:tiny_docs", "train", tiny_docs_dir),
    ):
        first = source.read(len(source) - 1)  # opens (and caches) readers where the format has them
        again = pickle.loads(pickle.dumps(source))
        assert "_open" not in again.__dict__ and again.read(len(source) - 1) == first
        assert again.fingerprint == source.fingerprint


def test_sources_read_in_grain_worker_processes(big_jsonl):
    import grain
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which only a main() would parse
    folder, rows = big_jsonl
    source = open_source(f"{folder}/*.jsonl", "train", CFG)
    dataset = grain.MapDataset.range(len(source)).map(lambda u: [r["i"] for r in source.read(u)])
    out = list(dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=1)))
    assert sum(out, []) == [r["i"] for r in rows]


def test_fingerprint_follows_the_content(tmp_path):
    write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}])
    before = open_source(str(tmp_path / "f.jsonl"), "train", CFG).fingerprint
    assert open_source(f"{tmp_path}/*.jsonl", "train", CFG).fingerprint == before  # the same files
    assert open_source(str(tmp_path / "f.jsonl"), "train", CFG).fingerprint == before
    write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"text": "b"}])
    assert open_source(str(tmp_path / "f.jsonl"), "train", CFG).fingerprint != before


def test_is_heldout_is_a_fixed_fraction_chosen_by_seed():
    picks = np.array([[sources.is_heldout(u, i, 0.1, seed=7) for i in range(100)] for u in range(200)])
    assert 0.09 < picks.mean() < 0.11
    again = np.array([[sources.is_heldout(u, i, 0.1, seed=7) for i in range(100)] for u in range(200)])
    other = np.array([[sources.is_heldout(u, i, 0.1, seed=8) for i in range(100)] for u in range(200)])
    assert (picks == again).all() and (picks != other).any()
    assert not any(sources.is_heldout(u, 0, 0.0, 1) for u in range(1000))


# --- Bad data: one line, the file, where, the fix ---------------------------------------------


def test_glob_errors(tmp_path):
    with pytest.raises(DataError) as e:
        open_source(f"{tmp_path}/none-*.jsonl", "train", CFG)
    assert one_line_error(e).startswith(f"data.dataset={tmp_path}/none-*.jsonl matches no file")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(DataError) as e:
        open_source(f"{tmp_path}/*", "train", CFG, key="data.validation")
    assert "data.validation=" in one_line_error(e) and "several formats" in str(e.value)
    (tmp_path / "c.csv").write_text("z")
    with pytest.raises(DataError) as e:
        open_source(f"{tmp_path}/*", "train", CFG)
    assert f"matches {tmp_path / 'c.csv'}, which is not a .jsonl.gz, .jsonl" in one_line_error(e)


def test_bad_json_lines_name_file_and_line(big_jsonl, tmp_path):
    folder, rows = big_jsonl
    lines = (folder / "b.jsonl").read_text(encoding="utf-8").split("\n")
    for n, bad, why in (
        (250, '{"text": "unterminated', "not a JSON object (Unterminated string"),
        (3, "[1, 2]", "a JSON list"),
    ):
        broken = lines.copy()
        broken[n - 1] = bad
        (tmp_path / "bad.jsonl").write_text("\n".join(broken), encoding="utf-8")
        source = open_source(str(tmp_path / "bad.jsonl"), "train", CFG)
        with pytest.raises(DataError) as e:
            all_records(source)
        assert one_line_error(e).startswith(f"{tmp_path / 'bad.jsonl'}:{n}: ") and why in str(e.value)


def test_missing_text_field_names_file_line_and_fields(big_jsonl):
    folder, _ = big_jsonl
    source = open_source(str(folder / "b.jsonl"), "train", CFG)
    record = next(r for u in reversed(range(len(source))) for r in reversed(source.read(u)))  # the file's last
    lines = (folder / "b.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n")
    with pytest.raises(DataError) as e:
        record_text(record, "body", record["_where"])
    assert (
        one_line_error(e) == f"{folder / 'b.jsonl'}:{len(lines)}: no field 'body' (fields: text, i); set data.text_key"
    )
    with pytest.raises(DataError, match="field 'i' holds a int, not text"):
        record_text(record, "i", record["_where"])


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    good = b'{"text": "fine"}\n' * 1000
    (tmp_path / "u.jsonl").write_bytes(good + b'{"text": "caf\xe9"}\n')
    source = open_source(str(tmp_path / "u.jsonl"), "train", CFG, unit_bytes=4096)
    with pytest.raises(DataError) as e:
        all_records(source)
    assert (
        one_line_error(e)
        == f"{tmp_path / 'u.jsonl'}: byte offset {len(good) + 13} is not UTF-8: re-encode the file as UTF-8"
    )
    (tmp_path / "u.txt").write_bytes(b"ok\n" * 10 + b"\xff\n")
    with pytest.raises(DataError, match=r"u\.txt: byte offset 30 is not UTF-8"):
        all_records(open_source(str(tmp_path / "u.txt"), "train", CFG))
    write_array_record(tmp_path / "u.array_record", [b"ok", b"ab\xc3"])
    with pytest.raises(DataError, match=r"u\.array_record: record 1: byte offset 2 is not UTF-8"):
        all_records(open_source(str(tmp_path / "u.array_record"), "train", CFG))
    with pytest.raises(DataError, match="where: field 'text': byte offset 1 is not UTF-8"):
        record_text({"text": b"a\xff"}, "text", "where")


# --- Config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.dataset=jsonl",
            "data.dataset='jsonl' is not a dataset: pass tiny_shakespeare, tfds:NAME[/CONFIG], or a glob",
        ),
        ("data.dataset=text_files", "data.dataset='text_files' is not a dataset: pass tiny_shakespeare"),
        ("data.dataset=/data/train-*.csv", "data.dataset='/data/train-*.csv': .csv files are not supported"),
        (
            "data.mixture=[{dataset: a.jsonl}, {dataset: b.parquet, weight: 0}]",
            "data.mixture[1].weight=0.0 must be > 0",
        ),
        ("data.mixture=[{dataset: jsonl, weight: 1}]", "data.mixture[0].dataset='jsonl' is not a dataset"),
        ("data.validation=split:test", "is a glob of files"),
        ("data.validation=tfds:x", "data.validation='tfds:x' is not a dataset: pass split:NAME or a glob"),
        ("data.workers=-1", "data.workers=-1 must be >= 0"),
        ("data.holdout=1.5", "data.holdout=1.5 must be in (0, 1)"),
    ],
)
def test_bad_data_config_is_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        configs.load(None, ["data.dataset=/d/*.txt", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_data_config_accepts_every_kind_of_dataset_and_a_mixture(tmp_path):
    mixture = "data.mixture=[{dataset: 'gs://b/web-*.jsonl.gz', weight: 3}, {dataset: 'tfds:wiki/en', text_key: body}]"
    cfg = configs.load(None, ["data.dataset=tfds:imdb_reviews/plain_text:1.0.0", "data.validation=/v/*.jsonl", mixture])
    assert [(m.dataset, m.weight, m.text_key) for m in cfg.data.mixture] == [
        ("gs://b/web-*.jsonl.gz", 3.0, "text"), ("tfds:wiki/en", 1.0, "body")
    ]  # fmt: skip
    (tmp_path / "c.yaml").write_text(configs.dump(cfg))
    assert configs.load(tmp_path / "c.yaml") == cfg
    assert configs.load(None, ["data.dataset=tfds:imdb_reviews", "data.validation=split:test"]).data.validation
    for spec in ("tiny_shakespeare", "~/d/*.parquet", "/d/shard-*", "x.array_record-00000-of-00004", "/d/v.txt"):
        assert configs.load(None, [f"data.dataset={spec}"]).data.dataset == spec
