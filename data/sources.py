"""Sources: a corpus as a list of units, each read on its own by any process in any order.

A unit is about UNIT_BYTES of text: a byte range of a JSONL or .txt file, split at line ends (a
line belongs to the unit in which it starts); a whole .jsonl.gz file (gzip cannot seek); a Parquet
row group; a range of ArrayRecord or TFDS records sized from the average record size. Opening a
source stats its files and reads Parquet/ArrayRecord footers and nothing else: no index of records
is ever built, so memory grows with the number of files, never with their size.

A Source holds paths and counts only, so it pickles into Grain worker processes; the readers a
process opens are cached in `_open`, which pickling drops.

Records are dicts: JSON objects, Parquet rows, TFDS features (bytes decoded to str where UTF-8),
or {"text": ...} for .txt files and plain-text ArrayRecord records. Two keys are ours:
`_where` says where a record came from, for messages (`record_text`, `locate`); `_end: False`
marks a piece of a .txt document that is not the document's last.
"""

import bisect
import contextlib
import difflib
import gzip
import hashlib
import itertools
import json
import math
import os
import re

import filelock
from etils import epath

from podtrain.data import DatasetUnavailable
from podtrain.data.config import FORMATS, DataConfig, dataset_kind, file_format

UNIT_BYTES = 256 * 1024
_GLOB_CHARS = "*?["
_JSON_RECORD = re.compile(rb"\s*\{\s*[\"}]")  # a record read as JSON; "{{Infobox" wikitext stays text
_BYTE_WHERE = re.compile(r"(.*):byte (\d+)")
_OPEN_READERS = 8  # per process and source: ArrayRecord readers kept open between reads


class DataError(DatasetUnavailable):
    """Bad data or a dataset that cannot be opened: one line naming the file, where in it, and the fix."""


class Source:
    """A corpus as len(self) >= 1 units; read(unit) gives that unit's records in file order."""

    name: str  # the spec as the user gave it
    fingerprint: str  # sha256 hex; changes when the content changes

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, unit: int) -> list[dict]:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, units={len(self)})"

    def _cached(self, key, make):
        """A reader opened once per process (dropped when pickled; the oldest closed beyond _OPEN_READERS)."""
        cache = self.__dict__.setdefault("_open", {})
        if key not in cache:
            if len(cache) >= _OPEN_READERS:
                _close(cache.pop(next(iter(cache))))
            cache[key] = make()
        return cache[key]


def _close(reader) -> None:
    close = getattr(reader, "close", None)
    if close is not None:
        close()


def _digest(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Files: each file cut into units


class _Files(Source):
    """Files in sorted order; unit u of the source is unit u - starts[i] of file i."""

    def __init__(self, name: str, paths: list[str], unit_bytes: int = UNIT_BYTES):
        self.name, self.paths, self.unit_bytes = name, list(paths), unit_bytes
        stats = [epath.Path(p).stat() for p in self.paths]
        self.sizes = [s.length for s in stats]
        counts = [max(1, self._count(i)) for i in range(len(self.paths))]
        self.starts = list(itertools.accumulate(counts, initial=0))
        files = (f"{p}:{s.length}:{s.mtime}" for p, s in zip(self.paths, stats))
        self.fingerprint = _digest(type(self).__name__, unit_bytes, *files)

    def _count(self, i: int) -> int:
        """Units of file i."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, unit: int) -> tuple[int, int]:
        """(file index, unit within that file)."""
        if not 0 <= unit < len(self):
            raise IndexError(f"{self.name}: unit {unit} out of range [0, {len(self)})")
        i = bisect.bisect_right(self.starts, unit) - 1
        return i, unit - self.starts[i]

    def _units_of(self, i: int) -> int:
        return self.starts[i + 1] - self.starts[i]


class _ByteRanges(_Files):
    """JSONL and .txt: unit k of a file is the lines that start in bytes [k*S, (k+1)*S)."""

    def _count(self, i: int) -> int:
        return math.ceil(self.sizes[i] / self.unit_bytes)

    def _lines(self, i: int, k: int) -> tuple[int, bytes]:
        """(offset of the block, the whole lines of unit k of file i as one block)."""
        return _read_lines(self.paths[i], k * self.unit_bytes, (k + 1) * self.unit_bytes)


def _read_lines(path: str, a: int, b: int) -> tuple[int, bytes]:
    """The lines of a file that start in bytes [a, b), and the offset of the first one.

    Plain reads (no mmap), so the same code reads gs:// through epath.
    """
    with epath.Path(path).open("rb") as f:
        start = 0
        if a > 0:
            f.seek(a - 1)  # the line that holds byte a-1 started in an earlier unit: skip past its end
            start = a - 1 + len(f.readline())
        if start >= b:  # one line covers the whole range
            return start, b""
        block = f.read(b - start)
        if len(block) == b - start and not block.endswith(b"\n"):
            block += f.readline()  # the last line started here: finish it
        return start, block


class JsonlFiles(_ByteRanges):
    def read(self, unit: int) -> list[dict]:
        i, k = self._locate(unit)
        start, block = self._lines(i, k)
        return _json_lines(self.paths[i], block, start, exact_lines=False)


class TextFiles(_ByteRanges):
    """One document per file, read in pieces split at line ends."""

    def read(self, unit: int) -> list[dict]:
        i, k = self._locate(unit)
        if self.sizes[i] == 0:
            return []
        start, block = self._lines(i, k)
        record = {"text": _decode(block, self.paths[i], start, start == 0)}
        if k < self._units_of(i) - 1:
            record["_end"] = False
        return [record]


class GzipJsonlFiles(_Files):
    """One unit per .jsonl.gz file: gzip cannot seek, so a file is read whole."""

    def _count(self, i: int) -> int:
        return 1

    def read(self, unit: int) -> list[dict]:
        path = self.paths[self._locate(unit)[0]]
        try:
            with epath.Path(path).open("rb") as f, gzip.open(f) as g:
                data = g.read()
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            raise DataError(f"{path}: not a complete gzip file ({e}): recompress it or rename it .jsonl") from None
        return _json_lines(path, data, 0, exact_lines=True)


def _json_lines(path: str, block: bytes, start: int, exact_lines: bool) -> list[dict]:
    """The JSON objects of `block` (file bytes from offset `start`), one per non-blank line.

    `_where` is FILE:LINE when line numbers are known (a whole file), else FILE:byte N (locate()
    counts the lines when a message needs them: a unit in the middle of a file does not know its
    first line's number, and counting it on every read would re-read the file before it).
    """
    records = []
    offset = start
    for n, line in enumerate(block.split(b"\n")):
        where = f"{path}:{n + 1}" if exact_lines else f"{path}:byte {offset}"
        if line.strip():
            record = _json_object(_decode(line, path, offset, offset == 0), where)
            record["_where"] = where
            records.append(record)
        offset += len(line) + 1
    return records


def _json_object(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except ValueError as e:
        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise DataError(f"{locate(where)}: not a JSON object ({detail})") from None
    if not isinstance(record, dict):
        raise DataError(f"{locate(where)}: not a JSON object (a JSON {type(record).__name__}): one object per line")
    return record


def _decode(data: bytes, path: str, offset: int, at_file_start: bool = False) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte offset {offset + e.start} is not UTF-8: re-encode the file as UTF-8") from None
    return text.removeprefix("\ufeff") if at_file_start else text


class ParquetFiles(_Files):
    """One unit per row group; rows as dicts of every column."""

    def _count(self, i: int) -> int:
        return self._file(self.paths[i], lambda pf: pf.metadata.num_row_groups)

    @staticmethod
    def _file(path: str, use):
        import pyarrow
        import pyarrow.parquet as pq

        with epath.Path(path).open("rb") as f:
            try:
                return use(pq.ParquetFile(f))
            except pyarrow.ArrowException as e:
                raise DataError(f"{path}: not a Parquet file ({e}): rewrite it with pyarrow or rename it") from None

    def read(self, unit: int) -> list[dict]:
        i, k = self._locate(unit)
        path = self.paths[i]

        def rows(pf):
            if k >= pf.metadata.num_row_groups:  # a file without row groups has one empty unit
                return 0, []
            first = sum(pf.metadata.row_group(g).num_rows for g in range(k))
            return first, pf.read_row_group(k).to_pylist()

        first, records = self._file(path, rows)
        for j, record in enumerate(records):
            _decode_values(record)
            record["_where"] = f"{path}: row {first + j}"
        return records


class ArrayRecordFiles(_Files):
    """Records of each file in ranges of about UNIT_BYTES (from the file's size / record count).

    A record is a JSON object when it starts with `{"` (or is `{}`), else UTF-8 text: {"text": ...}.
    """

    def __init__(self, name: str, paths: list[str], unit_bytes: int = UNIT_BYTES):
        self.records, self.per_unit = [], []  # per file, filled by _count
        super().__init__(name, paths, unit_bytes)

    def _count(self, i: int) -> int:
        n = self._reader(self.paths[i]).num_records()
        self.records.append(n)
        self.per_unit.append(max(1, round(self.unit_bytes * n / self.sizes[i])) if n else 1)
        return math.ceil(n / self.per_unit[i])

    def _reader(self, path: str):
        from array_record.python import array_record_module

        def make():
            try:
                return array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
            except (RuntimeError, ValueError) as e:  # riegeli reports a bad file as RuntimeError
                raise DataError(f"{path}: not an ArrayRecord file ({str(e).splitlines()[0]})") from None

        return self._cached(path, make)

    def read(self, unit: int) -> list[dict]:
        i, k = self._locate(unit)
        path = self.paths[i]
        begin = k * self.per_unit[i]
        end = min(begin + self.per_unit[i], self.records[i])
        if begin >= end:
            return []
        records = self._reader(path).read(begin, end)
        return [_array_record(data, f"{path}: record {begin + j}") for j, data in enumerate(records)]


def _array_record(data: bytes, where: str) -> dict:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: byte offset {e.start} is not UTF-8: write records as UTF-8 text or JSON") from None
    record = _json_object(text, where) if _JSON_RECORD.match(data) else {"text": text}
    record["_where"] = where
    return record


def _decode_values(record: dict) -> None:
    """bytes values that are UTF-8 become str (TFDS Text features, Parquet binary columns); others stay bytes."""
    for key, value in record.items():
        if isinstance(value, bytes):
            with contextlib.suppress(UnicodeDecodeError):  # record_text names the offset if this is the text
                record[key] = value.decode("utf-8")
        elif isinstance(value, dict):
            _decode_values(value)


# ---------------------------------------------------------------------------------------------
# TFDS (and tiny_shakespeare, which is a TFDS builder of ours)


class TfdsSource(Source):
    """One split of a prepared ArrayRecord TFDS dataset, read through its data source."""

    def __init__(self, name: str, builder, split: str, unit_bytes: int = UNIT_BYTES):
        info = builder.info.splits[split]
        self.name, self.split = name, split
        # What reopens the builder in another process: our own class (not registered) or the TFDS name.
        self.builder_cls = type(builder) if name == "tiny_shakespeare" else None
        self.builder_name = name.removeprefix("tfds:")
        self.data_dir = str(builder.data_dir_root)
        self.records = info.num_examples
        size = int(info.num_bytes) or sum(epath.Path(p).stat().length for p in info.filepaths)
        self.per_unit = max(1, round(unit_bytes * self.records / size)) if self.records and size else 1
        self.fingerprint = _digest("tfds", builder.info.full_name, split, self.records, size, unit_bytes)

    def __len__(self) -> int:
        return max(1, math.ceil(self.records / self.per_unit))

    def _data_source(self):
        def make():
            import tensorflow_datasets as tfds

            if self.builder_cls is not None:
                builder = self.builder_cls(data_dir=self.data_dir, file_format="array_record")
            else:
                builder = tfds.builder(self.builder_name, data_dir=self.data_dir)
            return builder.as_data_source(split=self.split)

        return self._cached("data_source", make)

    def read(self, unit: int) -> list[dict]:
        if not 0 <= unit < len(self):
            raise IndexError(f"{self.name}: unit {unit} out of range [0, {len(self)})")
        begin = unit * self.per_unit
        indices = list(range(begin, min(begin + self.per_unit, self.records)))
        records = [dict(r) for r in self._data_source().__getitems__(indices)] if indices else []
        for index, record in zip(indices, records):
            _decode_values(record)
            record["_where"] = f"{self.name} {self.split}: record {index}"
        return records


def _tfds_builder(spec: str, cfg: DataConfig, key: str):
    import tensorflow_datasets as tfds

    name = spec.removeprefix("tfds:")
    try:
        return tfds.builder(name, data_dir=_data_dir(cfg))
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('tfds:' + c for c in close)}?" if close else "see `tfds.list_builders()`"
        raise DataError(f"{key}={spec}: TFDS has no dataset {base!r}: {hint}") from None
    except ValueError as e:  # an unknown config or version of a known dataset
        raise DataError(f"{key}={spec}: {str(e).splitlines()[0]}") from None


def _is_prepared(builder) -> bool:
    return builder.data_path.exists() and builder.is_prepared()  # is_prepared warns on a fresh dir


def _data_dir(cfg: DataConfig) -> str:
    return os.path.expanduser(cfg.data_dir)


def _tiny_shakespeare(cfg: DataConfig):
    """The tiny_shakespeare builder, prepared once as ArrayRecord (offline from data.manual_dir if given)."""
    import tensorflow_datasets as tfds

    from podtrain.data import tiny_shakespeare

    data_dir = epath.Path(_data_dir(cfg))
    data_dir.mkdir(parents=True, exist_ok=True)
    # Several processes on one machine (launch local) share data_dir: one builds, the rest wait.
    with filelock.FileLock(os.fspath(data_dir / ".tiny_shakespeare.lock")):
        builder = tiny_shakespeare.TinyShakespeare(data_dir=os.fspath(data_dir), file_format="array_record")
        if not _is_prepared(builder):
            tfds.disable_progress_bar()
            manual_dir = os.path.abspath(os.path.expanduser(cfg.manual_dir)) if cfg.manual_dir else None
            source_dir = builder.fetch_source(manual_dir, epath.Path(data_dir) / "downloads" / builder.name)
            config = tfds.download.DownloadConfig(manual_dir=os.fspath(source_dir))
            builder.download_and_prepare(download_config=config)
    return builder


def prepare(dataset: str, cfg: DataConfig, key: str = "data.dataset") -> None:
    """Build a TFDS dataset (downloading it) or tiny_shakespeare as ArrayRecord in data.data_dir; globs need nothing.

    open_source never downloads a TFDS dataset (it may be terabytes); this is the explicit step.
    """
    kind = dataset_kind(dataset)
    if kind == "tiny_shakespeare":
        _tiny_shakespeare(cfg)
    elif kind == "tfds":
        builder = _tfds_builder(dataset, cfg, key)
        if not _is_prepared(builder):
            builder.download_and_prepare(file_format="array_record")


def _open_tfds(spec: str, split: str, cfg: DataConfig, key: str, unit_bytes: int) -> TfdsSource:
    if spec == "tiny_shakespeare":
        builder = _tiny_shakespeare(cfg)
    else:
        builder = _tfds_builder(spec, cfg, key)
        name = spec.removeprefix("tfds:")
        if not _is_prepared(builder):
            raise DataError(
                f"{key}={spec} is not prepared in data.data_dir={cfg.data_dir}: run "
                f"`tfds build {name} --data_dir {_data_dir(cfg)} --file_format array_record`"
            )
        file_format_ = builder.info.file_format
        if file_format_ is not None and file_format_.value != "array_record":
            raise DataError(
                f"{key}={spec} is prepared as {file_format_.value} in {builder.data_dir}, and reading by unit "
                f"needs ArrayRecord: run `tfds build {name} --data_dir {_data_dir(cfg)} --file_format array_record`"
            )
    if split not in builder.info.splits:
        splits = ", ".join(sorted(builder.info.splits))
        raise DataError(
            f"{key}={spec} has no split {split!r} (splits: {splits}): "
            "set data.validation=split:NAME, or a glob of validation files"
        )
    return TfdsSource(spec, builder, split, unit_bytes)


# ---------------------------------------------------------------------------------------------
# Opening a spec


SOURCES = {
    ".jsonl": JsonlFiles,
    ".jsonl.gz": GzipJsonlFiles,
    ".txt": TextFiles,
    ".parquet": ParquetFiles,
    ".array_record": ArrayRecordFiles,
}


def open_source(
    dataset: str, split: str, cfg: DataConfig, *, key: str = "data.dataset", unit_bytes: int = UNIT_BYTES
) -> Source:
    """The source a dataset spec names (data/config.py): for tiny_shakespeare and tfds:NAME, its split `split`;
    for a glob, the matched files (a glob is one split; `split` is not used).

    `key` is the config key the spec came from, for messages (data.validation, data.mixture[1].dataset).
    Raises DataError: an unknown or unprepared TFDS dataset, a missing split, a glob that matches no
    file or files of an unsupported or of several formats.
    """
    if dataset_kind(dataset) != "files":
        return _open_tfds(dataset, split, cfg, key, unit_bytes)
    paths = _match(dataset, key)
    formats = {}
    for path in paths:
        fmt = file_format(path)
        if fmt is None:
            raise DataError(
                f"{key}={dataset} matches {path}, which is not a {', '.join(FORMATS)} file: "
                "narrow the glob to one format, e.g. /data/train-*.jsonl"
            )
        formats.setdefault(fmt, path)
    if len(formats) > 1:
        (a, pa), (b, pb) = list(formats.items())[:2]
        raise DataError(
            f"{key}={dataset} matches files of several formats ({pa} is {a}, {pb} is {b}): a glob names one "
            "format; list several globs in data.mixture"
        )
    return SOURCES[next(iter(formats))](dataset, paths, unit_bytes)


def _match(spec: str, key: str) -> list[str]:
    """The files a glob matches, sorted; local or gs:// (epath: the user's string is never resolved)."""
    pattern = os.path.expanduser(spec) if spec.startswith("~") else spec
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS)), None)
    if first is None:
        paths = [pattern] if epath.Path(pattern).is_file() else []
    else:
        root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
        try:
            paths = sorted(os.fspath(p) for p in epath.Path(root).glob("/".join(parts[first:])))
        except NotImplementedError:  # epath refuses ** (every folder would be listed on GCS)
            raise DataError(f"{key}={spec}: ** is not supported: name each folder level with *") from None
    if not paths:
        raise DataError(f"{key}={spec} matches no file: check the path (the glob is matched as written)")
    return paths


# ---------------------------------------------------------------------------------------------
# Records


def record_text(record: dict, text_key: str, where: str) -> str:
    """record[text_key], or DataError naming `where` (a record's `_where`, or what the caller knows)."""
    where = where or "a record"
    if text_key not in record:
        fields = ", ".join(k for k in record if not k.startswith("_")) or "none"
        raise DataError(f"{locate(where)}: no field {text_key!r} (fields: {fields}); set data.text_key")
    text = record[text_key]
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{locate(where)}: field {text_key!r}: byte offset {e.start} is not UTF-8") from None
    if not isinstance(text, str):
        raise DataError(
            f"{locate(where)}: field {text_key!r} holds a {type(text).__name__}, not text; set data.text_key"
        )
    return text


def locate(where: str) -> str:
    """A record's `_where` for a message: FILE:byte N becomes FILE:LINE (the file is read up to N)."""
    m = _BYTE_WHERE.fullmatch(where or "")
    if not m:
        return where
    path, offset = m.group(1), int(m.group(2))
    try:
        return f"{path}:{_line_number(path, offset)}"
    except OSError:
        return where


def _line_number(path: str, offset: int) -> int:
    lines, left = 1, offset
    with epath.Path(path).open("rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            left -= len(chunk)
    return lines


_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a fixed, well-spread hash of an int (Python's hash() varies per process)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def is_heldout(unit: int, index_in_unit: int, fraction: float, seed: int) -> bool:
    """Whether record `index_in_unit` of `unit` is held out for validation: the same answer in every
    process and run, about `fraction` of all records, a different choice per seed."""
    return _mix(_mix(_mix(seed & _MASK) ^ unit) ^ index_in_unit) < fraction * 2.0**64
