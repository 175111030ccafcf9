"""Pre-tokenized caches: `podtrain data prepare` writes them, training reads them instead of its sources.

A cache is one folder holding meta.json and one ArrayRecord file whose record u is unit u's documents
(`pipeline.documents` of the unit's kept records, in file order) as an .npz read with
allow_pickle=False. Its key is everything those tokens depend on: the source's fingerprint
(data/sources.py), the tokenizer's fingerprint, the text field and which records are kept (a glob's
held-out fraction depends on data.holdout). Training shuffles a slot's documents
with the same seed either way, so its batches are identical with and without the cache.

Where training looks: `data.cache` (default DATA_DIR/podtrain_cache, DATA_DIR being data.data_dir)
is a folder of caches, one sub-folder per key, named SOURCE-KEY by fingerprint prefixes. Training
uses the sub-folder of its exact key when there is one and reads the source otherwise; caches of
the same source made with other tokenizers sit beside it and are never used (training says so in
one line). `data.cache` may instead name one cache folder (one holding meta.json, as `podtrain data
prepare` prints): training must then use it, so one made with another tokenizer, of other records
or of a source this run does not read is refused (DataError, one line naming both fingerprints and
the fix: rerun `podtrain data prepare` or delete the folder).

A cache is written into a .tmp-* folder beside its key and renamed to the key once complete (on a
local disk the rename is atomic), and a reader requires meta.json and every unit's record: a killed
prepare leaves only a .tmp-* folder, which nothing reads (delete it).
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import uuid

import grain
import numpy as np
from etils import epath
from tqdm import tqdm

from podtrain.data import pipeline, sources, tokenizer
from podtrain.data.config import DataConfig
from podtrain.data.sources import DataError

FORMAT = 1  # of meta.json and the records; another value is refused with "delete it"
META, UNITS = "meta.json", "units.array_record"
FOLDER = "podtrain_cache"  # under data.data_dir when data.cache is ""
SHOWN = 16  # hex digits of a fingerprint shown in messages and folder names
DOC_KEYS = ("tokens", "starts", "loss_mask", "whole", "bytes")


def root(data: DataConfig) -> epath.Path:
    """The folder data.cache names (a folder of caches, or one cache), ~ expanded."""
    spec = data.cache or f"{data.data_dir.rstrip('/')}/{FOLDER}"
    return epath.Path(os.path.expanduser(spec) if spec.startswith("~") else spec)


def identity(x: pipeline.Input, tok: tokenizer.Tokenizer) -> dict:
    """What a cache of input x's documents depends on: meta.json holds it, the folder is named by it."""
    held = {"keep": x.keep, "holdout": x.holdout, "seed": pipeline.HOLDOUT_SEED}
    records = "all" if x.keep == "all" or x.holdout <= 0 else held
    return {
        "format": FORMAT,
        "source": {"fingerprint": x.source.fingerprint, "units": len(x.source)},
        "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint},
        "text_key": x.text_key,
        "records": records,
    }


def folder_name(ident: dict) -> str:
    rest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return f"{ident['source']['fingerprint'][:SHOWN]}-{rest[:SHOWN]}"


@dataclasses.dataclass(eq=False)
class Cache:
    """One complete cache folder, open for reading; pickles without its reader (Grain workers)."""

    folder: str
    meta: dict

    def read(self, unit: int) -> dict[str, np.ndarray]:
        """Unit `unit`'s documents, as pipeline.documents gives them."""
        data = self._reader().read(unit, unit + 1)[0]
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in DOC_KEYS}

    def _reader(self):
        reader = self.__dict__.get("_open")
        if reader is None:
            from array_record.python import array_record_module

            path = os.fspath(epath.Path(self.folder) / UNITS)
            reader = self.__dict__["_open"] = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
        return reader

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "meta": self.meta}


def open_cache(folder: epath.Path) -> Cache:
    """The cache in `folder`, checked complete; DataError naming the folder and the fix otherwise."""
    fix = f"delete {folder} and run `podtrain data prepare` again"
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data.cache: {folder}/{META} is not readable ({e}): {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"data.cache: {folder} is a cache of format {version}, not {FORMAT}: {fix}")
    units = meta["source"]["units"]
    try:
        from array_record.python import array_record_module

        reader = array_record_module.ArrayRecordReader(os.fspath(folder / UNITS), "readahead_buffer_size:0")
        records = reader.num_records()
        reader.close()
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(f"data.cache: {folder}/{UNITS} is not readable ({str(e).splitlines()[0]}): {fix}") from None
    if records != units:
        raise DataError(f"data.cache: {folder}/{UNITS} holds {records} units of {units}: {fix}")
    return Cache(os.fspath(folder), meta)


# -- training: which inputs read a cache -------------------------------------------------------


def attach(
    groups: list[list[pipeline.Input]], tok: tokenizer.Tokenizer, data: DataConfig
) -> list[list[pipeline.Input]]:
    """The groups of inputs (training, validation) with each input's cache set where there is one
    for its exact key (module docstring). DataError when data.cache names one cache that fits none."""
    folder = root(data)
    if (folder / META).exists():
        return _attach_pinned(groups, tok, open_cache(folder))
    out = []
    for group in groups:
        out.append([_attach_one(x, tok, folder) for x in group])
    return out


def _attach_one(x: pipeline.Input, tok, folder: epath.Path) -> pipeline.Input:
    ident = identity(x, tok)
    key = folder / folder_name(ident)
    if (key / META).exists():
        cache = open_cache(key)
        if _same(cache.meta, ident):
            return dataclasses.replace(x, cache=cache)
    others = [p for p in _siblings(folder, x.source.fingerprint) if p.name != key.name]
    made_with = {_meta(p).get("tokenizer", {}).get("fingerprint", "?")[:SHOWN] for p in others}
    made_with.discard(tok.fingerprint[:SHOWN])
    if made_with:
        print(
            f"data: {x.source.name} is read from its files: data.cache={folder} holds caches of it made with "
            f"tokenizer {', '.join(sorted(made_with))}, not this run's {tok.fingerprint[:SHOWN]} "
            "(run `podtrain data prepare` to make one)",
            flush=True,
        )
    return x


def _siblings(folder: epath.Path, source_fingerprint: str) -> list[epath.Path]:
    if not folder.is_dir():
        return []
    try:
        return sorted(p for p in folder.glob(f"{source_fingerprint[:SHOWN]}-*") if (p / META).exists())
    except OSError:
        return []


def _meta(folder: epath.Path) -> dict:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _same(meta: dict, ident: dict) -> bool:
    return _identity_of(meta) == ident


def _identity_of(meta: dict) -> dict:
    """meta.json's identity (what identity() gives), without what it says for people (names, counts)."""
    out = {k: meta.get(k) for k in ("format", "source", "tokenizer", "text_key", "records")}
    out["source"] = {k: (meta.get("source") or {}).get(k) for k in ("fingerprint", "units")}
    out["tokenizer"] = {k: (meta.get("tokenizer") or {}).get(k) for k in ("kind", "fingerprint")}
    return out


def _attach_pinned(groups, tok, cache: Cache) -> list[list[pipeline.Input]]:
    """data.cache names one cache: it serves every input of its exact key; one that fits none is refused."""
    meta, used = cache.meta, False
    out = []
    for group in groups:
        row = []
        for x in group:
            if _same(meta, identity(x, tok)):
                x, used = dataclasses.replace(x, cache=cache), True
            row.append(x)
        out.append(row)
    if not used:
        raise DataError(_refusal(groups, tok, cache))
    return out


def _refusal(groups, tok, cache: Cache) -> str:
    """Why a named cache fits no input of the run, most specific reason first."""
    meta, folder = cache.meta, cache.folder
    fix = f"run `podtrain data prepare` with this config and pass the folder it prints, or delete {folder}"
    ins = [x for group in groups for x in group]
    same_source = [x for x in ins if x.source.fingerprint == meta["source"]["fingerprint"]]
    theirs = meta["source"].get("name", meta["source"]["fingerprint"][:SHOWN])
    if not same_source:
        names = ", ".join(sorted({x.source.name for x in ins}))
        return f"data.cache={folder} is a cache of {theirs}, which this run does not read ({names}): {fix}"
    made = meta["tokenizer"]
    if made["fingerprint"] != tok.fingerprint:
        return (
            f"data.cache={folder} was made with tokenizer {made['kind']} {made['fingerprint'][:SHOWN]}, and this "
            f"run's is {tok.kind} {tok.fingerprint[:SHOWN]}: {fix}"
        )
    theirs, want = _identity_of(meta), identity(same_source[0], tok)
    diff = next((k for k in ("text_key", "records", "source") if theirs[k] != want[k]), "source")
    return f"data.cache={folder} holds {diff} {theirs[diff]!r}, and this run reads {want[diff]!r}: {fix}"


# -- prepare -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One cache of `podtrain data prepare`: where, of what, and whether this call wrote it."""

    folder: str
    source: str
    units: int
    tokens: int
    written: bool


def prepare(data: DataConfig, progress: bool = False) -> list[Prepared]:
    """Write the cache of every training and validation input of `data` that has none yet.

    TFDS datasets are built first (downloaded: sources.prepare); the tokenizer is the one
    pretraining builds (a char vocabulary from the training documents only). Tokenizes in data.workers Grain worker
    processes (0: in this one). DataError before a cache is complete leaves no cache behind.
    """
    specs = [("data.dataset", data.dataset)] if not data.mixture else []
    specs += [(f"data.mixture[{i}].dataset", e.dataset) for i, e in enumerate(data.mixture)]
    for key, spec in specs:
        sources.prepare(spec, data, key)
    train_in, val_in = pipeline.inputs(data)
    tok = tokenizer.from_config(data.tokenizer, lambda: pipeline.texts(train_in))
    folder = root(data)
    if (folder / META).exists():
        folder = folder.parent  # data.cache names one cache: write beside it
    done, out = set(), []
    for x in train_in + val_in:
        ident = identity(x, tok)
        name = folder_name(ident)
        if name not in done:
            done.add(name)
            out.append(_write(x, tok, ident, folder, name, data.workers, progress))
    return out


def _write(x, tok, ident: dict, folder: epath.Path, name: str, workers: int, progress: bool) -> Prepared:
    key = folder / name
    if (key / META).exists():
        cache = open_cache(key)
        return Prepared(os.fspath(key), x.source.name, len(x.source), cache.meta.get("tokens", 0), False)
    if key.exists():
        raise DataError(f"data.cache: {key} exists without {META} (not written by podtrain data prepare): delete it")
    from array_record.python import array_record_module

    made_root = not folder.exists()
    tmp = folder / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = array_record_module.ArrayRecordWriter(os.fspath(tmp / UNITS), "group_size:1")
        tokens = 0
        try:
            bar = tqdm(total=len(x.source), desc=x.source.name, unit="unit", disable=not progress)
            for record, n in _encoded(x, tok, workers):
                writer.write(record)
                tokens += n
                bar.update(1)
            bar.close()
        finally:
            writer.close()
        meta = ident | {"source": ident["source"] | {"name": x.source.name}, "tokens": tokens}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            tmp.rename(key)
        except OSError:
            if not (key / META).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another prepare of the same key finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_root:
            _remove_empty(folder)
        raise
    return Prepared(os.fspath(key), x.source.name, len(x.source), tokens, True)


def _remove_empty(folder: epath.Path) -> None:
    with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
        folder.rmdir()


def _encoded(x: pipeline.Input, tok, workers: int):
    """(record bytes, tokens) of every unit of x, in order; tokenized in Grain worker processes."""
    ds = grain.MapDataset.range(len(x.source)).map(_Encode(x, tok))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    if workers:
        ds = pipeline.with_workers(ds, workers)
    it = iter(ds)
    try:
        yield from it
    finally:
        if hasattr(it, "close"):
            it.close()


@dataclasses.dataclass(frozen=True)
class _Encode:
    x: pipeline.Input
    tok: tokenizer.Tokenizer

    def __call__(self, unit) -> tuple[bytes, int]:
        n, pick = pipeline.unit_documents(self.x, self.tok, int(unit))
        docs = pick(list(range(n)))
        buf = io.BytesIO()
        np.savez(buf, **docs)
        return buf.getvalue(), len(docs["tokens"])
