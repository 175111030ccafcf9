"""Data configuration.

A dataset is named by a spec (`data.dataset`, `data.mixture[i].dataset`): `tiny_shakespeare`,
`tfds:NAME[/CONFIG]`, or a glob of files, local or gs://. The spec's form is checked here, without
touching any file; whether the files exist is found out when the source opens (data/sources.py).
"""

import dataclasses
import re

# File formats by name ending, longest first (.jsonl.gz before .jsonl). TFDS writes ArrayRecord shards
# as NAME.array_record-00000-of-00008, so that ending counts too.
FORMATS = (".jsonl.gz", ".jsonl", ".parquet", ".txt", ".array_record")
_SHARDED_ARRAY_RECORD = re.compile(r"\.array_record-\d+-of-\d+$")
_GLOB_CHARS = "*?["
SPEC_HELP = "pass tiny_shakespeare, tfds:NAME[/CONFIG], or a glob of files such as /data/train-*.jsonl"


def file_format(path: str) -> str | None:
    """The format (one of FORMATS) a file's name says, or None."""
    base = path.rsplit("/", 1)[-1]
    if _SHARDED_ARRAY_RECORD.search(base):
        return ".array_record"
    return next((ext for ext in FORMATS if base.endswith(ext)), None)


def dataset_kind(spec: str) -> str:
    """'tiny_shakespeare', 'tfds' or 'files' (checked by check_dataset)."""
    if spec == "tiny_shakespeare":
        return "tiny_shakespeare"
    return "tfds" if spec.startswith("tfds:") else "files"


def check_dataset(key: str, spec: str, *, named: bool = True) -> None:
    """ValueError naming `key` unless `spec` is a dataset spec (`named`: tiny_shakespeare/tfds allowed)."""
    if named and spec == "tiny_shakespeare":
        return
    if named and spec.startswith("tfds:"):
        if not spec[len("tfds:") :].strip("/"):
            raise ValueError(f"{key}={spec!r} names no TFDS dataset: pass tfds:NAME[/CONFIG], e.g. tfds:imdb_reviews")
        return
    if file_format(spec):
        return
    base = spec.rsplit("/", 1)[-1]
    tail = re.split(r"[*?\[\]]", base)[-1]  # the literal end of the file name pattern
    if "." in tail:  # a fixed extension, and not one we read
        ext = tail[tail.index(".") :]
        raise ValueError(f"{key}={spec!r}: {ext} files are not supported: use {', '.join(FORMATS)} files")
    if "/" not in spec and not any(c in spec for c in _GLOB_CHARS):
        help_ = SPEC_HELP if named else "pass split:NAME or a glob of files such as /data/validation-*.jsonl"
        raise ValueError(f"{key}={spec!r} is not a dataset: {help_}")
    # A folder-like pattern without an extension (/data/shard-*): the matched files' names decide.


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    """One source of `data.mixture`: documents drawn from it in proportion to `weight`."""

    dataset: str
    weight: float = 1.0
    text_key: str = "text"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "tiny_shakespeare"  # see the module docstring
    tokenizer: str = "char"  # char, byte, or a tokenizer file or folder (data/tokenizer.py), local or gs://
    seq_len: int = 64
    data_dir: str = "~/.cache/podtrain/tfds"  # where TFDS builds and reads ArrayRecord files
    manual_dir: str = ""  # folder holding the source file (input.txt) for offline preparation
    eval_batches: int = 100  # fixed validation windows per eval = eval_batches * train.batch_size
    text_key: str = "text"  # the field of each record that holds its document
    # "": the split named validation (tiny_shakespeare, tfds), or data.holdout of a glob's documents;
    # split:NAME: that named split; else a glob of validation files.
    validation: str = ""
    holdout: float = 0.01  # fraction of a glob's documents held out for validation when data.validation is ""
    # each entry's weight is its share of the training units (~256 KiB of text each: data/sources.py)
    mixture: tuple[MixtureEntry, ...] = ()
    workers: int = 0  # tokenizing worker processes (0: in the training process)
    # pre-tokenized caches (`podtrain data prepare`, data/cache.py): a folder of them ("": DATA_DIR/podtrain_cache),
    # or one cache folder that training must use
    cache: str = ""

    def __post_init__(self):
        check_dataset("data.dataset", self.dataset)
        for i, entry in enumerate(self.mixture):
            check_dataset(f"data.mixture[{i}].dataset", entry.dataset)
            if not entry.weight > 0:
                raise ValueError(f"data.mixture[{i}].weight={entry.weight} must be > 0")
            if not entry.text_key:
                raise ValueError(f"data.mixture[{i}].text_key is empty: name the field holding the text")
        self._check_validation()
        if not self.tokenizer:
            raise ValueError("data.tokenizer is empty: pass char, byte, or a tokenizer.json / tokenizer.model path")
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len={self.seq_len} must be > 0")
        if self.eval_batches <= 0:
            raise ValueError(f"data.eval_batches={self.eval_batches} must be > 0")
        if not self.text_key:
            raise ValueError("data.text_key is empty: name the field holding the text (default text)")
        if not 0 < self.holdout < 1:
            raise ValueError(f"data.holdout={self.holdout} must be in (0, 1), e.g. 0.01")
        if self.workers < 0:
            raise ValueError(f"data.workers={self.workers} must be >= 0 (0: tokenize in the training process)")

    def _check_validation(self) -> None:
        if not self.validation:
            return
        if not self.validation.startswith("split:"):
            check_dataset("data.validation", self.validation, named=False)
            return
        if not self.validation[len("split:") :]:
            raise ValueError("data.validation='split:' names no split: pass split:NAME, e.g. split:test")
        datasets = [e.dataset for e in self.mixture] or [self.dataset]
        files = [d for d in datasets if dataset_kind(d) == "files"]
        if files:
            raise ValueError(
                f"data.validation={self.validation} needs named splits, and {files[0]} is a glob of files: "
                "pass a glob of validation files, or leave data.validation empty to hold out data.holdout"
            )
