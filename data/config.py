"""Data configuration."""

import dataclasses

from podtrain.model.config import check, check_choice

DATASETS = ("tiny_shakespeare", "text_files", "jsonl")  # the last two: a local folder, data.manual_dir
TOKENIZERS = ("char", "byte")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "tiny_shakespeare"
    tokenizer: str = "char"
    seq_len: int = 64
    data_dir: str = "~/.cache/podtrain/tfds"  # where TFDS builds and reads ArrayRecord files
    manual_dir: str = ""  # folder holding the source file (input.txt) for offline preparation
    eval_batches: int = 100  # fixed validation windows per eval = eval_batches * train.batch_size

    def __post_init__(self):
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        check(self.seq_len > 0, f"data.seq_len={self.seq_len} must be > 0")
        check(self.eval_batches > 0, f"data.eval_batches={self.eval_batches} must be > 0")
