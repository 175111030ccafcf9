"""A dataset's splits: built once as ArrayRecord, read back as text or examples, encoded.

Pretraining (train/loop.py) and fine-tuning (train/finetune.py) load their data the same way and
differ only in the tokenizer: pretraining builds one from the corpus; fine-tuning brings the base
run's, which may not know every character of the new data, so encoding failures name where they are.
"""

from pathlib import Path

import filelock
import numpy as np
import tensorflow_datasets as tfds

from podtrain.data import packing, sources, text_files
from podtrain.data.config import DataConfig
from podtrain.data.tokenizer import Tokenizer


def prepare(cfg: DataConfig) -> tfds.core.DatasetBuilder:
    """Build the dataset as ArrayRecord once (offline from data.manual_dir if given)."""
    if cfg.dataset == "tiny_shakespeare":
        return sources._tiny_shakespeare(cfg)
    data_dir = Path(cfg.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Several processes on one machine (launch local) share data_dir: one builds, the rest wait.
    with filelock.FileLock(data_dir / f".{cfg.dataset}.lock"):
        return _prepare_locked(cfg, data_dir)


def _prepare_locked(cfg: DataConfig, data_dir: Path) -> tfds.core.DatasetBuilder:
    # local folders: the builder config depends on the files
    folder = Path(cfg.manual_dir).expanduser().resolve()
    builder = text_files.BUILDERS[cfg.dataset](folder=folder, data_dir=str(data_dir), file_format="array_record")
    if not (builder.data_path.exists() and builder.is_prepared()):
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return builder


def split_text(builder: tfds.core.DatasetBuilder, split: str) -> str:
    if split not in builder.info.splits:  # local text folders may have no test.txt
        return ""
    source = builder.as_data_source(split=split)  # tiny_shakespeare: one record per speech
    return "\n\n".join(source[i]["text"].decode("utf-8") for i in range(len(source)))


def split_examples(builder: tfds.core.DatasetBuilder, split: str) -> list[dict[str, str]]:
    source = builder.as_data_source(split=split)
    return [{k: source[i][k].decode("utf-8") for k in ("prompt", "completion")} for i in range(len(source))]


def texts(cfg: DataConfig, names: tuple[str, ...]) -> dict[str, str]:
    """{split: its text} ("" for a split a local folder lacks); DatasetUnavailable before anything is written."""
    builder = prepare(cfg)
    return {split: split_text(builder, split) for split in names}


def examples(cfg: DataConfig, names: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    """{split: its {'prompt', 'completion'} examples} of a jsonl dataset; DatasetUnavailable as in `texts`."""
    builder = prepare(cfg)
    return {split: split_examples(builder, split) for split in names}


def encode(tok: Tokenizer, split: str, content: str | list[dict[str, str]]):
    """A split's token ids, or for examples [(prompt + completion ids, prompt length)] (data/packing.py).

    Text the tokenizer cannot encode raises a one-line ValueError naming the split (and the example)
    and every unknown character.
    """
    if isinstance(content, str):
        return _encode(tok, content, f"data {split} split")
    for i, ex in enumerate(content):
        _encode(tok, ex["prompt"] + ex["completion"], f"data {split} example {i}")
    return packing.encode(tok, content)


def _encode(tok: Tokenizer, text: str, where: str) -> np.ndarray:
    try:
        return tok.encode(text)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
