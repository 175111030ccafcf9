"""Deterministic, resumable Grain pipelines: per-process slices of seeded global batches.

Any random-access source of rows (dicts of arrays) is served the same way: its rows in an order
shuffled with the seed (reshuffled each epoch by Grain); global batch b is rows [b*B, (b+1)*B) of
that order, and process p of P reads rows [p*B/P, (p+1)*B/P) of it. So the global batch is the same
for any process count, and so is the Grain iterator state, {'next_index': global batches read},
which lets a run resume on another process count (train/checkpoint.py). Pretraining's rows are
(seq_len + 1)-token windows (Windows), fine-tuning's may be packed examples (data/packing.py).
"""

import grain
import numpy as np


class Windows:
    """Random-access source: row i is the window tokens[i : i + seq_len + 1] as inputs and targets."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) <= seq_len:
            raise ValueError(f"data.seq_len={seq_len} must be shorter than the split ({len(tokens)} tokens)")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        window = self.tokens[i : i + self.seq_len + 1]
        return {"inputs": window[:-1], "targets": window[1:]}


def train_dataset(
    source: grain.sources.RandomAccessDataSource,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Endless per-process batches of `source`'s rows: each key (global_batch / process_count, ...)."""
    local = global_batch // process_count
    shuffled = grain.MapDataset.source(source).shuffle(seed=seed)

    def global_index(j: int) -> int:
        return (j // local) * global_batch + process_index * local + j % local

    rows = grain.MapDataset.range(2**62).map(lambda j: shuffled[global_index(j)])
    batches = rows.batch(local, drop_remainder=True)
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))


def eval_batches(
    source: grain.sources.RandomAccessDataSource,
    global_batch: int,
    num_batches: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The fixed validation set: the first num_batches global batches of a seeded order."""
    it = iter(train_dataset(source, global_batch, seed, process_index, process_count))
    return [next(it) for _ in range(num_batches)]
