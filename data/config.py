"""Data configuration."""

import dataclasses

DATASETS = ("tiny_shakespeare", "text_files", "jsonl")  # the last two: a local folder, data.manual_dir


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "tiny_shakespeare"
    tokenizer: str = "char"  # char, byte, or a tokenizer file or folder (data/tokenizer.py), local or gs://
    seq_len: int = 64
    data_dir: str = "~/.cache/podtrain/tfds"  # where TFDS builds and reads ArrayRecord files
    manual_dir: str = ""  # folder holding the source file (input.txt) for offline preparation
    eval_batches: int = 100  # fixed validation windows per eval = eval_batches * train.batch_size

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"data.dataset={self.dataset!r} is not one of {', '.join(DATASETS)}")
        if not self.tokenizer:
            raise ValueError("data.tokenizer is empty: pass char, byte, or a tokenizer.json / tokenizer.model path")
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len={self.seq_len} must be > 0")
        if self.eval_batches <= 0:
            raise ValueError(f"data.eval_batches={self.eval_batches} must be > 0")
