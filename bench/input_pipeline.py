"""Input pipeline throughput and peak memory on synthetic JSONL corpora, against the train step it feeds.

What is measured, and how:
- Two seeded synthetic JSONL corpora, a large one (default 2 GiB) and a small one (default 205 MiB,
  a tenth), in files of --file-mb: records {"text": ...} of log-normal lengths (mean --doc-bytes)
  made of words drawn from a Zipf-like vocabulary of English-looking words built from syllables,
  with commas, full stops and paragraph breaks, so that BPE has real merges to look up. Written
  with numpy in big chunks into --dir once per (seed, size) and reused while its manifest matches.
- A byte-level BPE tokenizer of --vocab ids, trained on the first --tokenizer-mb of the small
  corpus by podtrain's tokenizer training and loaded with `podtrain.data.tokenizer.load`; reused
  when present.
- The pipeline alone: `pipeline.Batches` over the training inputs of
  `pipeline.inputs(DataConfig(dataset=GLOB))`, for data.workers 0, 1 and 2, at the nanoGPT shape
  (T 64, B 12) and at a realistic one (T 1024, B 8), on both corpora. Each configuration runs in a
  fresh process. tokens/s = B * T per batch over the batches drawn after a warm-up (the first
  batch, which waits for Grain's workers to start, and --warmup seconds more), for at least
  --seconds and at least --units slots (one slot: one ~256 KiB unit of the corpus), at most
  --max-seconds. Peak RSS: the largest sum of the RSS of that process and of all its children
  (the workers), sampled every 20 ms in a thread from before the tokenizer loads until the
  iterator closes.
- The nanoGPT-shape train step (configs/shakespeare_char.yaml's model with the BPE vocabulary
  rounded up to 128), timed as bench/train_throughput.py times it (the real step over
  `train.state.layout` at `podtrain pretrain`'s CPU layout, compile excluded, median of --reps):
  the tokens/s a run consumes.

The last lines hold the figures against the targets, PASS or MISS each: every pipeline run's
tokens/s >= 3x the train step's (per worker count, the worst run), every run's peak RSS < 1 GB,
and the peak RSS on the large corpus within 10% of the small corpus's (per shape and worker count).

    python bench/input_pipeline.py [--dir /tmp/podtrain_bench_corpus] [--seed 0] [--workers 0,1,2]
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

MiB = 2**20
SHAPES = {"nanogpt": (64, 12), "realistic": (1024, 8)}  # (seq_len T, global batch B)
STEP_TARGET, RSS_LIMIT, RSS_SPREAD = 3.0, 1e9, 0.10
CORPUS_VERSION = 1  # bump when the generator changes: corpora on disk are remade

# -- corpus ---------------------------------------------------------------------------------------

# syllables are onset + vowel, a word's last one gets a coda (- for none); the common words rank first
ONSETS = "b c d f g h k l m n p r s t v w y bl br ch cl cr dr fl fr gr pl pr sh sk sl sp st str th tr wh"
VOWELS = "a e i o u a e i o ai ea ee oo ou ie y"
CODAS = "- - - - n r s t d l m ng st nd ck th rt ll"
COMMON = "the of and to a in is that it was for on as with he be at by his this had not are but from or"
PUNCTUATION = {b",": 0.045, b".": 0.035, b".\\n\\n": 0.006}  # JSON-escaped paragraph break
TABLE = 2**22  # resolution of the sampling table: probabilities in steps of 2.4e-7


def vocabulary(seed: int, size: int = 30_000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(all entries' bytes, flat; offset and length of each entry, int32; a table of 2**22 entry
    ids, each as often as its probability says, to sample from by uniform index).

    Words are " " + syllables; frequent ranks get the short words, as in English, with Zipf weights
    1 / (rank + 2.7) ** 1.07; punctuation entries carry no leading space."""
    rng = np.random.default_rng([seed, 0])
    onsets, vowels, codas, common = ONSETS.split(), VOWELS.split(), CODAS.replace("-", "").split(" "), COMMON.split()
    words, seen = list(common), set(common)
    while len(words) < size:
        n = 1 + rng.binomial(3, 0.4)
        w = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(n))
        w += codas[rng.integers(len(codas))]
        if w not in seen:
            seen.add(w)
            words.append(w)
    words = words[: len(common)] + sorted(words[len(common) :], key=len)
    weights = 1.0 / (np.arange(len(words)) + 2.7) ** 1.07
    weights *= (1 - sum(PUNCTUATION.values())) / weights.sum()
    entries = [b" " + w.encode() for w in words] + list(PUNCTUATION)
    probs = np.concatenate([weights, list(PUNCTUATION.values())])
    lengths = np.array([len(e) for e in entries], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    flat = np.frombuffer(b"".join(entries), np.uint8)
    cdf = np.cumsum(probs / probs.sum())
    table = np.searchsorted(cdf, (np.arange(TABLE) + 0.5) / TABLE).clip(0, len(entries) - 1).astype(np.int32)
    return flat, offsets, lengths, table


def write_jsonl(path: Path, size: int, rng: np.random.Generator, vocab, doc_bytes: float) -> int:
    """Whole lines {"text": ...} until the file holds at least `size` bytes; returns its size."""
    flat, offsets, lengths, table = vocab
    per_word = float(lengths[table].mean())
    sigma = 1.0
    pre, post = b'{"text": "', b'"}\n'
    written = 0
    with open(path, "wb") as f:
        while written < size:
            doc = np.clip(rng.lognormal(np.log(doc_bytes) - sigma**2 / 2, sigma, 1024), 40, 200_000)
            n_words = np.maximum(1, (doc / per_word).astype(np.int64))
            ids = table[rng.integers(0, TABLE, int(n_words.sum()), dtype=np.int32)]
            lens = lengths[ids]
            ends = np.cumsum(lens, dtype=np.int32)  # int32: a chunk is far below 2**31 bytes, and twice as fast
            body = flat[np.arange(ends[-1], dtype=np.int32) - np.repeat(ends - lens - offsets[ids], lens)].tobytes()
            stop = ends[np.cumsum(n_words) - 1]
            start = np.concatenate([[0], stop[:-1]])
            start += np.frombuffer(body, np.uint8)[start] == ord(" ")
            keep = np.searchsorted(np.cumsum(stop - start + len(pre) + len(post)), size - written) + 1
            chunk = b"".join(b"".join((pre, body[a:b], post)) for a, b in zip(start[:keep], stop[:keep]))
            f.write(chunk)
            written += len(chunk)
    return written


def make_corpus(root: Path, name: str, size: int, file_size: int, seed: int, doc_bytes: float) -> tuple[Path, bool]:
    """(the corpus folder, whether it was made now): files part-NNNNN.jsonl of file_size bytes (the
    last one smaller) with `size` bytes in all; reused when its manifest says the same."""
    folder = root / f"{name}-{size // MiB}MiB-seed{seed}"
    want = {"version": CORPUS_VERSION, "seed": seed, "size": size, "file_size": file_size, "doc_bytes": doc_bytes}
    manifest = folder / "manifest.json"
    if manifest.exists():
        have = json.loads(manifest.read_text())
        files = have.get("files", {})
        if {k: have.get(k) for k in want} == want and all(
            (folder / f).exists() and (folder / f).stat().st_size == n for f, n in files.items()
        ):
            return folder, False
    folder.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    for old in folder.glob("*.jsonl"):
        old.unlink()
    vocab, files, left, i = vocabulary(seed), {}, size, 0
    while left > 0:
        part = f"part-{i:05d}.jsonl"
        rng = np.random.default_rng([seed, 1, i])
        files[part] = write_jsonl(folder / part, min(file_size, left), rng, vocab, doc_bytes)
        left -= files[part]
        i += 1
    manifest.write_text(json.dumps({**want, "files": files}, indent=1))
    return folder, True


def corpus_texts(folder: Path, limit: int):
    """The texts of the corpus's first `limit` bytes of lines."""
    seen = 0
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, "rb") as f:
            for line in f:
                yield json.loads(line)["text"]
                seen += len(line)
                if seen >= limit:
                    return


# -- tokenizer ----------------------------------------------------------------------------------


def train_tokenizer(corpus: Path, root: Path, vocab_size: int, sample: int) -> tuple[Path, bool]:
    """(the folder of a byte-level BPE tokenizer trained on the corpus's first `sample` bytes by
    `podtrain tokenizer train`'s library function, whether it was trained now)."""
    folder = root / f"bpe{vocab_size}-{corpus.name}-{sample // MiB}MiB"
    if (folder / "tokenizer.json").exists():
        return folder, False
    from podtrain.data import tokenizer_train

    tokenizer_train.train(corpus_texts(corpus, sample), vocab_size, "bpe").save(folder)
    return folder, True


# -- the pipeline, one configuration per process -------------------------------------------------


class PeakRss(threading.Thread):
    """Largest RSS of this process plus all its children, sampled every `every` seconds."""

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0, threading.Event()

    def sample(self) -> None:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a worker that just exited
                total += child.memory_info().rss
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def stop(self) -> int:
        self.sample()
        self.done.set()
        self.join()
        return self.peak


def slots_done(batches) -> int:
    """Slots the streams have finished reading (each stream's slot ordinal, summed)."""
    return sum(k for k, _, _ in batches.get_state()["streams"].values())


def measure(job: dict) -> dict:
    """One configuration of the pipeline alone (see the module docstring); runs in its own process."""
    rss = PeakRss()
    rss.start()
    from podtrain.data import pipeline, tokenizer
    from podtrain.data.config import DataConfig

    t, b, workers = job["seq_len"], job["batch"], job["workers"]
    tok = tokenizer.load(job["tokenizer"])
    cfg = DataConfig(dataset=job["glob"], tokenizer=job["tokenizer"], seq_len=t, workers=workers)
    train_in, _ = pipeline.inputs(cfg)
    start = time.perf_counter()
    batches = pipeline.Batches(train_in, tok, t, b, job["seed"], workers=workers)
    next(batches)
    first = time.perf_counter() - start
    while time.perf_counter() - start < first + job["warmup"]:
        next(batches)
    slots0, count, t0 = slots_done(batches), 0, time.perf_counter()
    while True:
        next(batches)
        count += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= job["seconds"] and (
            elapsed >= job["max_seconds"] or slots_done(batches) - slots0 >= job["units"]
        ):
            break
    slots = slots_done(batches) - slots0
    batches.close()
    return {
        **job,
        "tokens_per_s": count * b * t / elapsed,
        "seconds": elapsed,
        "batches": count,
        "slots": slots,
        "source_units": len(train_in[0].source),
        "first_batch_s": first,
        "peak_rss": rss.stop(),
    }


def run_measure(job: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(job)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the train step ------------------------------------------------------------------------------


def train_step_tokens_per_s(vocab_size: int, reps: int, n_steps: int) -> tuple[float, str]:
    """(median tokens/s of the nanoGPT-shape step at pretrain's layout, what was timed)."""
    import train_throughput  # the sibling bench: one way of timing the step

    from podtrain.parallel import devices

    cores = devices.use_cpu_cores()  # before the backend starts
    vocab = -(-vocab_size // 128) * 128
    base = train_throughput.load_config([], 1)
    num_devices = devices.cpu_device_count(base.train.batch_size, cores, base.model.d_model)
    cfg = train_throughput.load_config([f"model.vocab_size={vocab}"], num_devices)
    per_step, _ = train_throughput.time_train_step(cfg, reps, n_steps)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    label = (
        f"L{cfg.model.num_layers} D{cfg.model.d_model} N{cfg.model.num_heads} F{cfg.model.mlp_dim} "
        f"V{cfg.model.vocab_size} T{cfg.data.seq_len} B{cfg.train.batch_size}, {num_devices} CPU device(s)"
    )
    return tokens / statistics.median(per_step), label


# -- report --------------------------------------------------------------------------------------


def label(r: dict) -> str:
    return f"{r['corpus']} corpus, T{r['seq_len']} B{r['batch']}, {r['workers']} worker(s)"


def report(results: list[dict], step_tok_s: float) -> None:
    """The target lines: PASS or MISS, with the figures behind each."""
    for w in sorted({r["workers"] for r in results}):
        worst = min((r for r in results if r["workers"] == w), key=lambda r: r["tokens_per_s"])
        ratio = worst["tokens_per_s"] / step_tok_s
        verdict = "PASS" if ratio >= STEP_TARGET else "MISS"
        print(
            f"{verdict} pipeline >= {STEP_TARGET:g}x train step, {w} worker(s): worst {ratio:.1f}x "
            f"({worst['tokens_per_s']:,.0f} vs {step_tok_s:,.0f} tokens/s; {label(worst)})"
        )
    top = max(results, key=lambda r: r["peak_rss"])
    verdict = "PASS" if top["peak_rss"] < RSS_LIMIT else "MISS"
    print(f"{verdict} peak RSS < {RSS_LIMIT / 1e9:g} GB: largest {top['peak_rss'] / 1e6:,.0f} MB ({label(top)})")
    pairs = {}
    for r in results:
        pairs.setdefault((r["seq_len"], r["batch"], r["workers"]), {})[r["corpus"]] = r["peak_rss"]
    spreads = [(rss["large"] / rss["small"] - 1, key) for key, rss in pairs.items() if len(rss) == 2]
    if spreads:
        spread, (t, b, w) = max(spreads, key=lambda s: abs(s[0]))
        verdict = "PASS" if abs(spread) <= RSS_SPREAD else "MISS"
        print(
            f"{verdict} peak RSS large vs small corpus within {RSS_SPREAD:.0%}: worst {spread:+.1%} "
            f"(T{t} B{b}, {w} worker(s); all: {', '.join(f'{s:+.1%}' for s, _ in spreads)})"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/podtrain_bench_corpus", help="scratch folder of corpora and tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--large-mb", type=int, default=2048, help="large corpus size, MiB")
    p.add_argument("--small-mb", type=int, default=205, help="small corpus size, MiB")
    p.add_argument("--file-mb", type=int, default=128, help="size of each corpus file, MiB")
    p.add_argument("--doc-bytes", type=float, default=3000.0, help="mean document length in bytes")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--tokenizer-mb", type=int, default=16, help="MiB of the small corpus the tokenizer trains on")
    p.add_argument("--workers", default="0,1,2", help="data.workers values, comma-separated")
    p.add_argument("--shapes", default="nanogpt,realistic", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--corpora", default="small,large", help="comma-separated, of small, large")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of batches after the first one, not timed")
    p.add_argument("--seconds", type=float, default=10.0, help="least seconds timed per configuration")
    p.add_argument("--units", type=int, default=100, help="least slots read while timed per configuration")
    p.add_argument("--max-seconds", type=float, default=60.0, help="most seconds timed per configuration")
    p.add_argument("--reps", type=int, default=7, help="train step repetitions (median reported)")
    p.add_argument("--steps", type=int, default=20, help="train steps per repetition")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # one configuration, in a child process
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return

    root = Path(args.dir)
    corpora = {}
    for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
        if name not in args.corpora.split(","):
            continue
        start = time.perf_counter()
        folder, made = make_corpus(root, name, mb * MiB, args.file_mb * MiB, args.seed, args.doc_bytes)
        files = sorted(folder.glob("*.jsonl"))
        size = sum(f.stat().st_size for f in files)
        how = f"made in {time.perf_counter() - start:.1f} s" if made else "reused"
        print(f"corpus {name}: {folder}, {len(files)} files, {size / 1e9:.3f} GB ({size / MiB:,.0f} MiB), {how}")
        corpora[name] = folder
    start = time.perf_counter()
    small = make_corpus(root, "small", args.small_mb * MiB, args.file_mb * MiB, args.seed, args.doc_bytes)[0]
    tok_dir, trained = train_tokenizer(small, root, args.vocab, args.tokenizer_mb * MiB)
    from podtrain.data import tokenizer

    tok = tokenizer.load(str(tok_dir))
    how = f"trained in {time.perf_counter() - start:.1f} s" if trained else "reused"
    print(f"tokenizer: byte-level BPE, {tok.vocab_size} ids, on {args.tokenizer_mb} MiB of the small corpus, {how}")
    sample = list(corpus_texts(small, MiB))
    ids = sum(len(x) for x in tok.encode_batch(sample))
    print(f"  {sum(len(s.encode()) for s in sample) / ids:.2f} UTF-8 bytes per token over 1 MiB of text")

    results = []
    for name, folder in corpora.items():
        for shape in args.shapes.split(","):
            t, b = SHAPES[shape]
            for w in (int(x) for x in args.workers.split(",")):
                job = {
                    "corpus": name,
                    "glob": str(folder / "*.jsonl"),
                    "tokenizer": str(tok_dir),
                    "seq_len": t,
                    "batch": b,
                    "workers": w,
                    "seed": args.seed,
                    "warmup": args.warmup,
                    "seconds": args.seconds,
                    "units": args.units,
                    "max_seconds": args.max_seconds,
                }
                r = run_measure(job)
                results.append(r)
                print(
                    f"pipeline {label(r)}: {r['tokens_per_s']:,.0f} tokens/s over {r['seconds']:.1f} s "
                    f"({r['batches']} batches, {r['slots']} of {r['source_units']} units read, first batch "
                    f"{r['first_batch_s']:.1f} s), peak RSS {r['peak_rss'] / 1e6:,.0f} MB"
                )
    step_tok_s, what = train_step_tokens_per_s(tok.vocab_size, args.reps, args.steps)
    print(f"train step, nanoGPT shape with the BPE vocabulary ({what}): {step_tok_s:,.0f} tokens/s")
    for r in results:
        print(f"ratio pipeline / train step, {label(r)}: {r['tokens_per_s'] / step_tok_s:.1f}x")
    report(results, step_tok_s)


if __name__ == "__main__":
    main()
