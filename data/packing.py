"""Prompt/completion examples packed into fixed-length rows, with the loss on completions only.

Example i with prompt p and completion c is the token sequence s = p + c; it contributes inputs
s[:-1], targets s[1:] and weight 1 where the target is a completion token. Examples are placed
whole, in order, into rows of seq_len positions (a new row when the next one does not fit; longer
examples are cut to seq_len). Each carries its segment id (1, 2, ... within a row; 0 is padding,
weight 0) and positions restarting at 0, so attention never crosses examples (model/transformer.py).

The rows, as a random-access source (Rows), are batched like pretraining's windows
(data/pipeline.py), so batches and the Grain iterator state do not depend on the process count.
"""

import numpy as np

KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def encode(tok, examples) -> list[tuple[np.ndarray, int]]:
    """[(prompt + completion token ids, prompt length)] for dicts with 'prompt' and 'completion'."""
    out = []
    for ex in examples:
        prompt, completion = tok.encode(ex["prompt"]), tok.encode(ex["completion"])
        out.append((np.concatenate([prompt, completion]).astype(np.int32), len(prompt)))
    return out


def pack(examples: list[tuple[np.ndarray, int]], seq_len: int) -> dict[str, np.ndarray]:
    """Rows {KEYS: (R, seq_len)}; examples with no completion token left after cutting are dropped."""
    rows: list[dict[str, np.ndarray]] = []
    row, used, segment = None, seq_len, 0
    for ids, n_prompt in examples:
        n = min(len(ids) - 1, seq_len)
        if n < 1 or n_prompt >= n + 1:
            continue
        if used + n > seq_len:
            row = {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in KEYS}
            rows.append(row)
            used, segment = 0, 0
        segment += 1
        span = slice(used, used + n)
        row["inputs"][span], row["targets"][span] = ids[:n], ids[1 : n + 1]
        row["weights"][span] = np.arange(1, n + 1) >= n_prompt  # target j is token j + 1
        row["segment_ids"][span], row["positions"][span] = segment, np.arange(n)
        used += n
    if not rows:
        raise ValueError(f"no example has a completion token within data.seq_len={seq_len}")
    return {k: np.stack([r[k] for r in rows]) for k in KEYS}


class Rows:
    """Random-access source: row i of `pack`'s rows, {KEYS: (seq_len,)}."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows["inputs"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.rows.items()}
