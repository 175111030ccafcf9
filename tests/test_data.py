"""The streaming pipeline: packed rows are exact pieces of documents, batches are deterministic,
resumable and split across processes exactly, examples stay whole, validation is fixed and counts
its bytes. Sources here are small in-memory lists of units (the file formats have their own tests,
test_sources.py); the tokenizer is the real char tokenizer."""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podtrain.data import pipeline, tokenizer
from podtrain.data.config import DataConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
TOK = tokenizer.CharTokenizer(ALPHABET)
T, B = 16, 4


@dataclasses.dataclass
class Units:
    """A Source over in-memory units of records."""

    units: list[list[dict]]
    name: str = "memory"
    fingerprint: str = "memory"

    def __len__(self) -> int:
        return len(self.units)

    def read(self, unit: int) -> list[dict]:
        return [dict(r) for r in self.units[unit]]


def corpus(seed: int = 0, units: int = 7, fields=("text",)) -> Units:
    rng = np.random.default_rng(seed)

    def text(n):
        return "".join(ALPHABET[i] for i in rng.integers(0, 26, n))

    return Units([[{f: text(int(rng.integers(1, 40))) for f in fields} for _ in range(int(rng.integers(1, 12)))]
                  for _ in range(units)])  # fmt: skip


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(it, n))


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def batches(source, seed=1, **kw) -> pipeline.Batches:
    return pipeline.Batches([pipeline.Input(source)], TOK, T, B, seed, **kw)


def test_rows_are_pieces_of_documents_with_their_own_segments():
    source = corpus()
    docs = {TOK.decode(TOK.encode(r["text"])) for u in source.units for r in u}
    seen = set()
    for batch in take(batches(source), 12):
        assert all(batch[k].shape == (B, T) for k in pipeline.KEYS)
        for row in range(B):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            w = batch["weights"][row]
            np.testing.assert_array_equal(w, seg > 0)  # text: every real position counts, padding none
            for s in set(seg[seg > 0].tolist()):
                at = np.flatnonzero(seg == s)
                assert np.array_equal(at, np.arange(at[0], at[-1] + 1)), "a segment is contiguous"
                np.testing.assert_array_equal(pos[at], np.arange(len(at)))  # positions restart
                inputs, targets = batch["inputs"][row][at], batch["targets"][row][at]
                np.testing.assert_array_equal(inputs[1:], targets[:-1])  # one piece of one document
                piece = TOK.decode(inputs[1:])
                assert any(piece in d for d in docs)
                if targets[-1] == TOK.eos_id:  # a document's end: EOS is a target, never an input
                    seen.add(TOK.decode(inputs))
            assert TOK.eos_id not in batch["inputs"][row][seg > 0]
    assert seen and all(any(d.endswith(s) for d in docs) for s in seen)


def test_same_seed_same_batches_different_seed_different():
    first = take(batches(corpus(), seed=3), 4)
    assert_same(take(batches(corpus(), seed=3), 4), first)
    other = take(batches(corpus(), seed=4), 4)
    assert not np.array_equal(other[0]["inputs"], first[0]["inputs"])


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(processes):
    expected = take(batches(corpus()), 6)
    per_process = [take(batches(corpus(), process_index=p, process_count=processes), 6) for p in range(processes)]
    for step, want in enumerate(expected):
        for key in want:
            got = np.concatenate([b[step][key] for b in per_process])
            np.testing.assert_array_equal(got, want[key])


def test_iterator_state_resumes_exactly_also_on_another_process_count():
    it = batches(corpus())
    take(it, 5)
    state = it.get_state()
    rest = take(it, 4)
    again = batches(corpus())
    again.set_state(state)
    assert_same(take(again, 4), rest)
    halves = []
    for p in range(2):  # the global state read by two processes, each taking its streams
        half = batches(corpus(), process_index=p, process_count=2)
        half.set_state(state)
        halves.append(take(half, 4))
    for step, want in enumerate(rest):
        np.testing.assert_array_equal(np.concatenate([h[step]["inputs"] for h in halves]), want["inputs"])


def test_worker_processes_give_the_same_batches_and_resume():
    expected = take(batches(corpus()), 6)
    it = batches(corpus(), workers=1)
    try:
        assert_same(take(it, 3), expected[:3])
        state = it.get_state()
        it.set_state(state)
        assert_same(take(it, 3), expected[3:])
    finally:
        it.close()


def test_examples_stay_whole_with_loss_on_completion_and_eos():
    source = corpus(fields=("prompt", "completion"))
    pairs = {(r["prompt"], r["completion"]) for u in source.units for r in u}
    for batch in take(pipeline.Batches([pipeline.Input(source)], TOK, 48, B, 0), 6):
        for row in range(B):
            seg = batch["segment_ids"][row]
            for s in set(seg[seg > 0].tolist()):
                at = np.flatnonzero(seg == s)
                inputs, targets, w = (batch[k][row][at] for k in ("inputs", "targets", "weights"))
                full = TOK.decode(np.append(inputs, targets[-1]))
                if targets[-1] != TOK.eos_id:  # cut: longer than a row
                    assert len(at) == 48
                    continue
                match = [(p, c) for p, c in pairs if TOK.decode(np.append(inputs, targets[-1])) == p + c]
                assert match, full
                p, c = match[0]
                # weight 1 exactly where the target is a completion character or the EOS
                np.testing.assert_array_equal(w, np.arange(1, len(at) + 1) >= len(p))


def test_holdout_documents_never_train():
    source = corpus(units=5)
    heldout = pipeline.Input(source, holdout=0.3, keep="heldout")
    rest = pipeline.Input(source, holdout=0.3, keep="rest")
    held = set(pipeline.texts([heldout]))
    trained = set(pipeline.texts([rest]))
    assert held and trained and not held & trained
    assert held | trained == {r["text"] for u in source.units for r in u}


def test_mixture_follows_the_weights():
    a, b = corpus(1, units=50), corpus(2, units=50)
    slots = pipeline._Slots((len(a), len(b)), (3.0, 1.0), seed=0).table()
    share = np.mean([slots[g][0] == 0 for g in range(4000)])
    assert abs(share - 0.75) < 0.02


def test_validation_is_fixed_covers_the_split_and_counts_its_bytes():
    source = corpus(units=3)
    ins = [pipeline.Input(source)]
    val, nbytes = pipeline.eval_batches(ins, TOK, T, B, 50, seed=0)
    again, _ = pipeline.eval_batches(ins, TOK, T, B, 50, seed=0)
    assert_same(val, again)
    texts = [r["text"] for u in source.units for r in u]
    # everything fits in 50 batches: every document's pairs once, its bytes once
    assert sum(float(b["weights"].sum()) for b in val) == sum(len(t) for t in texts)  # len + eos - 1
    assert nbytes == pytest.approx(sum(len(t.encode()) for t in texts))
    halves = [pipeline.eval_batches(ins, TOK, T, B, 50, 0, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[0][7]["inputs"] for h in halves]), val[7]["inputs"])
    assert halves[0][1] + halves[1][1] == pytest.approx(nbytes)


def test_changing_document_a_leaves_document_b_bit_identical():
    """Packing: attention never crosses documents, so a row's other documents do not move by one bit."""
    from podtrain.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=TOK.vocab_size, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    source = Units([[{"text": "the quick brown fox"}, {"text": "jumps over the lazy dog"}]])
    row = next(pipeline.Batches([pipeline.Input(source)], TOK, 48, 1, 0))
    seg = row["segment_ids"][0]
    assert {1, 2} <= set(seg.tolist())  # the stream goes on into the next epoch: maybe more segments

    def logits(inputs):
        out = model(jnp.asarray(inputs), positions_BT=jnp.asarray(row["positions"]),
                    segment_ids_BT=jnp.asarray(row["segment_ids"]))[0]  # fmt: skip
        return np.asarray(out[0])

    base = logits(row["inputs"])
    changed = row["inputs"].copy()
    a = np.flatnonzero(seg == 1)
    changed[0, a[2]] = (changed[0, a[2]] + 1) % 26
    moved = logits(changed)
    b = np.flatnonzero(seg != 1)  # document B and whatever else shares the row
    np.testing.assert_array_equal(moved[b], base[b])
    assert not np.array_equal(moved[a[2:]], base[a[2:]])


def test_dataset_names_of_the_old_layout_are_refused_with_what_is_accepted():
    with pytest.raises(ValueError, match=r"data.dataset='jsonl'.*tfds:NAME"):
        DataConfig(dataset="jsonl")


def test_one_long_document_gives_every_stream_its_own_start_and_loses_no_pair():
    text = "".join(ALPHABET[i] for i in np.random.default_rng(3).integers(0, 27, 500))
    batch = next(pipeline.Batches([pipeline.Input(Units([[{"text": text}]]))], TOK, T, B, 0))
    assert len({bytes(r) for r in batch["inputs"]}) == B  # not four copies of one row
    docs = pipeline.documents(TOK, [{"text": text}], "text", "memory")
    turned = pipeline.rotate(docs, np.random.default_rng(0))
    pairs = {(int(a), int(b), i) for i, (a, b) in enumerate(zip(docs["tokens"][:-1], docs["tokens"][1:]))}
    got = []
    for d in range(len(turned["whole"])):
        ids = turned["tokens"][turned["starts"][d] : turned["starts"][d + 1]]
        got += list(zip(ids[:-1].tolist(), ids[1:].tolist()))
    assert len(got) == len(pairs) and sorted(got) == sorted((a, b) for a, b, _ in pairs)
    assert turned["bytes"].sum() == pytest.approx(docs["bytes"].sum())


def test_a_large_source_holds_out_whole_units_that_training_never_reads():
    source = corpus(units=40)
    heldout = pipeline.Input(source, holdout=0.1, keep="heldout")
    rest = pipeline.Input(source, holdout=0.1, keep="rest")
    held_units = [u for u in range(40) if heldout.unit_kept(u)]
    assert held_units and all(rest.unit_kept(u) is False for u in held_units)
    assert all(rest.unit_kept(u) and heldout.read(u) == [] for u in range(40) if u not in held_units)
