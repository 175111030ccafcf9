"""Streaming, deterministic, resumable batches of packed documents.

The global batch has B rows; row r of every batch comes from stream r. The corpus is a sequence of
global slots g = 0, 1, 2, ...; slot g names one unit of one source (data/sources.py): each source's
units in an order Grain shuffles anew every epoch, several sources mixed by weight with Grain's
`MapDataset.mix`. Stream r reads slots r, r+B, r+2B, ...: a slot's documents, in an order shuffled
with a seed of g, are tokenized ([bos] + ids + [eos]; or read as tokens from the source's
pre-tokenized cache, data/cache.py, which gives the same) and packed one after another into rows of
seq_len positions (concat-then-split: a text document continues in the stream's next row;
fine-tuning examples are placed whole, in a new row when the next one does not fit). Each document
piece in a row has its own segment id (1, 2, ...; 0 is padding, weight 0) and positions restarting
at 0, so attention never crosses documents (model/transformer.py).

Process p of P owns streams [p*B/P, (p+1)*B/P) and reads only their slots, so the global batch at
every step is the same for any process count. Slots are read and tokenized ahead by Grain, in
`data.workers` worker processes (0: a thread of this process). The iterator state, saved in every
checkpoint, is each stream's position (slot, document, pair within the document): a resumed run
sees exactly the batches of an uninterrupted one, on any process count.
"""

import collections
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator

import grain
import numpy as np

from podtrain.data import chat
from podtrain.data import sources as sources_lib
from podtrain.data.config import DataConfig, MixtureEntry

KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
HOLDOUT_SEED = 0
NAMED_SPLITS = ("tiny_shakespeare", "tfds:")  # datasets with their own validation split


@dataclasses.dataclass(frozen=True)
class Input:
    """One source of a split. `holdout` > 0: documents chosen by sources.is_heldout are the
    validation split (keep='heldout') and left out of training (keep='rest')."""

    source: sources_lib.Source
    weight: float = 1.0
    text_key: str = "text"
    holdout: float = 0.0
    keep: str = "all"  # 'all' | 'rest' | 'heldout'
    cache: object = None  # a data/cache.py Cache of exactly these documents: read instead of the source

    def unit_kept(self, unit: int) -> bool | None:
        """True: every document of the unit is kept; False: none (the unit need not be read); None:
        decided per document. A source of at least 1/holdout units holds out whole units, so that
        validation reads only those (a web corpus's 0.1% is whole files' worth, found without a scan);
        a smaller one holds out documents. Neither depends on train.seed: every run validates alike."""
        if self.keep == "all" or self.holdout <= 0:
            return True
        if self.holdout * len(self.source) >= 1:
            return sources_lib.is_heldout(unit, -1, self.holdout, HOLDOUT_SEED) == (self.keep == "heldout")
        return None

    def kept(self, unit: int, index: int) -> bool:
        whole = self.unit_kept(unit)
        if whole is not None:
            return whole
        return sources_lib.is_heldout(unit, index, self.holdout, HOLDOUT_SEED) == (self.keep == "heldout")

    def read(self, unit: int) -> list[dict]:
        """The unit's kept records."""
        if self.unit_kept(unit) is False:
            return []
        return [r for j, r in enumerate(self.source.read(unit)) if self.kept(unit, j)]


def inputs(cfg: DataConfig) -> tuple[list[Input], list[Input]]:
    """(training inputs, validation inputs) of the data config; DataError before anything is written."""
    entries = cfg.mixture or (MixtureEntry(cfg.dataset, 1.0, cfg.text_key),)
    keys = [f"data.mixture[{i}].dataset" for i in range(len(cfg.mixture))] or ["data.dataset"]
    train, val = [], []
    for e, key in zip(entries, keys):
        named = e.dataset.startswith(NAMED_SPLITS)
        source = sources_lib.open_source(e.dataset, "train", cfg, key=key)
        holdout = 0.0 if named or cfg.validation else cfg.holdout
        train.append(Input(source, e.weight, e.text_key, holdout, "rest" if holdout else "all"))
        if cfg.validation.startswith("split:"):
            split = cfg.validation[len("split:") :]
            val.append(Input(sources_lib.open_source(e.dataset, split, cfg, key=key), 1.0, e.text_key))
        elif not cfg.validation:
            if named:
                val.append(Input(sources_lib.open_source(e.dataset, "validation", cfg, key=key), 1.0, e.text_key))
            else:
                val.append(Input(source, 1.0, e.text_key, holdout, "heldout"))
    if cfg.validation and not cfg.validation.startswith("split:"):
        val = [
            Input(sources_lib.open_source(cfg.validation, "validation", cfg, key="data.validation"), 1.0, cfg.text_key)
        ]
    return train, val


def texts(ins: list[Input]) -> Iterator[str]:
    """Every kept document's text, in source order (a char tokenizer's vocabulary, tokenizer
    training): a text record's text, an example's prompt and completion, a chat's messages as
    chat.text writes them."""
    for x in ins:
        for unit in range(len(x.source)):
            for record in x.read(unit):
                where = record.get("_where", x.source.name)
                kind = _kind(record)
                if kind == "chat":
                    yield chat.text(chat.messages(record, where))
                elif kind == "example":
                    yield from (str(record["prompt"]), str(record["completion"]))
                else:
                    yield sources_lib.record_text(record, x.text_key, where)


# -- documents ----------------------------------------------------------------------------------


def _kind(record: dict) -> str:
    if chat.is_chat(record):
        return "chat"
    return "example" if "prompt" in record and "completion" in record else "text"


def documents(tok, records: list[dict], text_key: str, where: str) -> dict[str, np.ndarray]:
    """The records' token sequences, flat: 'tokens' (all documents' ids), 'starts' (n + 1 offsets),
    'loss_mask' (bool, aligned with 'tokens': whether the token counts as a target; a document's
    first token never is one), 'whole' (placed whole in a row), 'bytes' (UTF-8 bytes of the text the
    loss covers).

    A record is text (record[text_key]: [bos if add_bos] + ids + [eos], every target counts; a .txt
    piece with `_end` False gets no EOS), an example ('prompt' and 'completion': what transformers'
    tokenizer(prompt) gives, then the completion's ids and EOS; the completion and EOS count) or a
    chat ('messages': data/chat.py; the assistant turns and the final EOS count). Examples and chats
    are placed whole in a row.
    """
    kinds = [_kind(r) for r in records]
    plain = [i for i, k in enumerate(kinds) if k == "text"]
    texts_ = {i: sources_lib.record_text(records[i], text_key, records[i].get("_where", where)) for i in plain}
    try:
        encoded = dict(zip(plain, tok.encode_batch([texts_[i] for i in plain]))) if plain else {}
    except ValueError as e:  # a char vocabulary (of the training documents) meeting other characters
        raise sources_lib.DataError(f"{where}: {e}: build the tokenizer from data that has them") from None
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    seqs, masks, nbytes = [], [], []
    for i, (r, kind) in enumerate(zip(records, kinds)):
        if kind == "text":
            ids = np.concatenate([bos, encoded[i], [tok.eos_id] if r.get("_end", True) else []]).astype(np.int32)
            mask, size = np.ones(len(ids), bool), len(texts_[i].encode("utf-8"))
        elif kind == "example":
            prompt = tok.prompt(str(r["prompt"]))
            ids = np.concatenate([prompt, tok.encode(str(r["completion"])), [tok.eos_id]]).astype(np.int32)
            mask, size = np.arange(len(ids)) >= len(prompt), len(str(r["completion"]).encode("utf-8"))
        else:
            at = r.get("_where", where)
            ids, mask, size = chat.encode(tok, chat.messages(r, at), at)
        mask[:1] = False
        seqs.append(ids)
        masks.append(mask)
        nbytes.append(size)
    return _flat(seqs, masks, [k != "text" for k in kinds], nbytes)


def _flat(seqs: list, masks: list, whole: list, nbytes: list) -> dict[str, np.ndarray]:
    """Per-document token ids, loss masks, 'whole' flags and byte counts as documents()' flat arrays."""
    starts = np.zeros(len(seqs) + 1, np.int64)
    starts[1:] = np.cumsum([len(ids) for ids in seqs])
    return {
        "tokens": np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32),
        "starts": starts,
        "loss_mask": np.concatenate(masks).astype(bool) if masks else np.zeros(0, bool),
        "whole": np.asarray(whole, bool),
        "bytes": np.asarray(nbytes, np.float64),
    }


def _doc(docs: dict[str, np.ndarray], i: int) -> slice:
    return slice(docs["starts"][i], docs["starts"][i + 1])


def select(docs: dict[str, np.ndarray], order) -> dict[str, np.ndarray]:
    """`documents(...)` of the records `order` picks (indices into docs' records), in that order:
    what documents() of those records gives, as every document is tokenized on its own."""
    order = np.asarray(order, np.int64)
    return _flat(
        [docs["tokens"][_doc(docs, i)] for i in order],
        [docs["loss_mask"][_doc(docs, i)] for i in order],
        docs["whole"][order],
        docs["bytes"][order],
    )


def unit_documents(x: Input, tok, unit: int) -> tuple[int, Callable[[list[int]], dict[str, np.ndarray]]]:
    """(n, pick): the unit's n kept records, and pick(order) = documents() of those records in
    that order. With a cache the tokens come from it: the source is not read and nothing is tokenized."""
    if x.cache is not None:
        docs = x.cache.read(unit)
        return len(docs["whole"]), lambda order: select(docs, order)
    records = x.read(unit)
    return len(records), lambda order: documents(tok, [records[j] for j in order], x.text_key, x.source.name)


@dataclasses.dataclass(frozen=True)
class _Slots:
    """Global slot g -> (input index, unit): per input, its units shuffled anew each epoch, mixed by weight."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int

    def table(self) -> grain.MapDataset:
        per = [
            grain.MapDataset.range(n).shuffle(seed=self.seed + 7919 * s).repeat().map(_Tag(s))
            for s, n in enumerate(self.sizes)
        ]
        return per[0] if len(per) == 1 else grain.MapDataset.mix(per, weights=list(self.weights))


@dataclasses.dataclass(frozen=True)
class _Tag:
    index: int

    def __call__(self, unit) -> tuple[int, int]:
        return self.index, int(unit)


@dataclasses.dataclass
class _ReadSlot:
    """Local slot ordinal i -> (i, the slot's documents). Runs in Grain's workers: picklable."""

    ins: list[Input]
    tok: object
    slots: _Slots
    streams: tuple[int, ...]  # this process's global stream ids
    global_batch: int
    seed: int
    table: grain.MapDataset | None = None

    def global_slot(self, i: int) -> int:
        n = len(self.streams)
        return (i // n) * self.global_batch + self.streams[i % n]

    def __call__(self, i: int) -> tuple[int, dict[str, np.ndarray]]:
        if self.table is None:
            self.table = self.slots.table()
        g = self.global_slot(int(i))
        s, unit = self.table[g]
        n, pick = unit_documents(self.ins[s], self.tok, unit)
        rng = np.random.default_rng([self.seed, g])
        return int(i), rotate(pick(rng.permutation(n)), rng)


def rotate(docs: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The slot's pairs as a cycle cut at a random pair: the cut text document's tail comes first
    and its head last (two pieces; an example is never cut, the cycle starts at it). Streams that
    read the same unit (a corpus of one long document) then start at different places; no pair is
    lost or repeated."""
    n_docs = len(docs["whole"])
    pairs = np.maximum(np.diff(docs["starts"]) - 1, 0)
    if n_docs == 0 or pairs.sum() == 0:
        return docs
    q = int(rng.integers(pairs.sum()))
    d = int(np.searchsorted(np.cumsum(pairs), q, side="right"))
    cut = q - int(pairs[:d].sum())  # pair index within document d
    if docs["whole"][d] or cut == 0:
        order = [(e, 0, None) for e in [*range(d, n_docs), *range(d)]]
    else:  # tail: tokens [cut:], pairs [cut, n); head: tokens [:cut + 1], pairs [0, cut)
        order = [(d, cut, None), *((e, 0, None) for e in [*range(d + 1, n_docs), *range(d)]), (d, 0, cut + 1)]
    seqs = [docs["tokens"][_doc(docs, e)][a:b] for e, a, b in order]
    shares = [(len(ids) - 1) / pairs[e] if pairs[e] else 1.0 for ids, (e, _, _) in zip(seqs, order)]
    return _flat(
        seqs,
        [docs["loss_mask"][_doc(docs, e)][a:b] for e, a, b in order],
        [docs["whole"][e] for e, _, _ in order],
        [float(docs["bytes"][e]) * share for share, (e, _, _) in zip(shares, order)],
    )


# -- packing ------------------------------------------------------------------------------------


class _Packer:
    """Fills rows of seq_len positions from a sequence of slots' documents; position (k, d, j):
    slot ordinal k of the stream, document d of the slot, pair j of the document."""

    def __init__(self, seq_len: int, fetch: Callable[[int], dict[str, np.ndarray] | None], state=(0, 0, 0)):
        self.seq_len, self.fetch = seq_len, fetch
        self.k, self.d, self.j = state

    @property
    def state(self) -> list[int]:
        return [self.k, self.d, self.j]

    def row(self) -> tuple[dict[str, np.ndarray], float] | None:
        """(the next row, UTF-8 bytes of the text it covers); None once fetch runs out."""
        t = self.seq_len
        row = _empty_row(t)
        used, segment, nbytes = 0, 0, 0.0
        while used < t:
            docs = self.fetch(self.k)
            if docs is None:
                break
            if self.d >= len(docs["whole"]):
                self.k, self.d, self.j = self.k + 1, 0, 0
                continue
            a, b = docs["starts"][self.d], docs["starts"][self.d + 1]
            n = int(b - a) - 1  # (input, target) pairs of the document
            if n <= 0:
                self.d, self.j = self.d + 1, 0
                continue
            whole = bool(docs["whole"][self.d])
            if whole and used > 0 and n > t - used:
                break  # an example starts a new row
            take = min(n - self.j, t - used)
            span, src = slice(used, used + take), slice(a + self.j, a + self.j + take)
            row["inputs"][span] = docs["tokens"][src]
            row["targets"][span] = docs["tokens"][src.start + 1 : src.stop + 1]
            row["weights"][span] = docs["loss_mask"][src.start + 1 : src.stop + 1]
            segment += 1
            row["segment_ids"][span], row["positions"][span] = segment, np.arange(take)
            nbytes += float(docs["bytes"][self.d]) * take / n
            used, self.j = used + take, self.j + take
            if self.j >= n or whole:  # an example longer than a row is cut
                self.d, self.j = self.d + 1, 0
        return (row, nbytes) if used else None


def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row of padding: segment 0, weight 0."""
    return {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in KEYS}


def _nth(parts: list, k: int):
    return parts[k] if k < len(parts) else None


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in KEYS}


class Batches(grain.DatasetIterator):
    """Endless per-process batches {KEYS: (B/P, seq_len)} of the training inputs (module docstring)."""

    def __init__(self, ins, tok, seq_len, global_batch, seed, process_index=0, process_count=1, workers=0):
        super().__init__()
        if global_batch % process_count:
            raise ValueError(f"train.batch_size={global_batch} must be a multiple of the process count {process_count}")
        local = global_batch // process_count
        self.streams = tuple(range(process_index * local, (process_index + 1) * local))
        slots = _Slots(tuple(len(x.source) for x in ins), tuple(x.weight for x in ins), seed)
        self.read = _ReadSlot(ins, tok, slots, self.streams, global_batch, seed)
        self.seq_len, self.workers = seq_len, workers
        self._start({r: [0, 0, 0] for r in self.streams})

    def _start(self, positions: dict[int, list[int]]) -> None:
        n = len(self.streams)
        self.packers = []
        for stream, r in enumerate(self.streams):
            self.packers.append(_Packer(self.seq_len, functools.partial(self._fetch, stream), tuple(positions[r])))
        self.pending: list[dict[int, dict]] = [{} for _ in self.streams]
        first = min(p.k * n + stream for stream, p in enumerate(self.packers))
        self._close_source()
        ds = grain.MapDataset.range(first, 2**62).map(self.read)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * n))
        if self.workers:
            ds = with_workers(ds, self.workers)
        self.source = iter(ds)

    def _fetch(self, stream: int, k: int) -> dict[str, np.ndarray]:
        """Slot ordinal k of local stream `stream`, pulling the shared in-order reader up to it."""
        n, pending = len(self.streams), self.pending[stream]
        for old in [key for key in pending if key < k]:
            del pending[old]  # the stream has moved past it
        while k not in pending:
            i, docs = next(self.source)
            sl, sk = i % n, i // n
            if sk >= self.packers[sl].k:
                self.pending[sl][sk] = docs
        return pending[k]

    def check(self, slots: int = 8) -> None:
        """Read and tokenize the first slots here, so that bad records there fail before a run starts."""
        for i in range(min(slots, len(self.streams))):
            self.read(i)

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            return _stack([p.row()[0] for p in self.packers])
        except BaseException:  # a DataError of a later unit (re-raised by Grain as it is): stop the workers
            self.close()
            raise

    def get_state(self) -> dict:
        return {"streams": {str(r): p.state for r, p in zip(self.streams, self.packers)}}

    def set_state(self, state: dict) -> None:
        saved = state["streams"]
        missing = [r for r in self.streams if str(r) not in saved]
        if missing:
            raise ValueError(f"data iterator state lacks streams {missing[:3]} (saved with another global batch?)")
        self._start({r: saved[str(r)] for r in self.streams})

    def _close_source(self) -> None:
        source = getattr(self, "source", None)
        if source is not None and hasattr(source, "close"):
            source.close()

    def close(self) -> None:
        self._close_source()
        self.source = None


def _die_with_parent(worker_index: int, worker_count: int) -> None:
    """In a Grain worker: exit when the training process dies, also by SIGKILL (which runs no cleanup).

    A thread polls the parent's pid: prctl(PR_SET_PDEATHSIG) would fire when the *thread* that
    started the worker exits, which in Grain is not the end of the training process."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def with_workers(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
    """ds computed ahead in `workers` Grain worker processes.

    Arrays come back pickled through the queue rather than in shared memory: Grain unlinks a shared
    block in a background thread once the array is collected, so blocks still held at exit (slots
    read ahead) leak and Python warns about them on stderr. A slot's arrays are small (~1 MB).
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags, which a non-absl program never parses
        flags.FLAGS.mark_as_parsed()
    ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 62))
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
    return ds.mp_prefetch(options, worker_init_fn=_die_with_parent)


# -- validation -------------------------------------------------------------------------------


def eval_batches(
    ins: list[Input],
    tok,
    seq_len: int,
    global_batch: int,
    num_batches: int,
    seed: int,
    process_index=0,
    process_count=1,
) -> tuple[list[dict[str, np.ndarray]], float]:
    """(the fixed validation set as num_batches per-process batches, UTF-8 bytes of the text it covers).

    Validation documents, in source order, go round robin to the B streams (document j to stream
    j mod B), each packed like training rows; a stream's rows beyond num_batches are left out and
    missing rows are padding (weight 0). Every process reads the documents in order and tokenizes
    only its streams'.
    """
    local = global_batch // process_count
    first = process_index * local
    want = num_batches * (seq_len + 1)  # tokens a stream needs, at least
    docs = [collections.deque() for _ in range(local)]
    have = np.zeros(local, np.int64)
    j = 0
    for x in ins:
        for unit in range(len(x.source)):
            if have.min() >= want:
                break
            n, pick = unit_documents(x, tok, unit)
            mine = [[] for _ in range(local)]
            for i in range(n):
                if first <= (j + i) % global_batch < first + local:
                    mine[(j + i) % global_batch - first].append(i)
            j += n
            for stream in range(local):
                if mine[stream] and have[stream] < want:
                    d = pick(mine[stream])
                    docs[stream].append(d)
                    have[stream] += len(d["tokens"])
    rows, nbytes = [[] for _ in range(num_batches)], 0.0
    for stream in range(local):
        packer = _Packer(seq_len, functools.partial(_nth, list(docs[stream])))
        for b in range(num_batches):
            out = packer.row()
            if out is None:
                out = (_empty_row(seq_len), 0.0)
            rows[b].append(out[0])
            nbytes += out[1]
    return [_stack(r) for r in rows], nbytes
