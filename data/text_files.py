"""TFDS builders for a local folder of fine-tuning data, written as ArrayRecord.

`text_files`: FOLDER/{train,validation[,test]}.txt, one example per file (plain text).
`jsonl`: FOLDER/{train,validation[,test]}.jsonl, one {"prompt": str, "completion": str} per line.

The folder is data.manual_dir. Each distinct content gets its own builder config (named by a hash
of the files), so editing the files builds a new dataset instead of reading a stale one.
"""

import hashlib
import json
from pathlib import Path

import tensorflow_datasets as tfds

from podtrain.data import DatasetUnavailable

SPLITS = ("train", "validation", "test")
REQUIRED = ("train", "validation")


def _files(folder: Path, suffix: str) -> dict[str, Path]:
    found = {split: folder / f"{split}{suffix}" for split in SPLITS if (folder / f"{split}{suffix}").is_file()}
    missing = [f"{split}{suffix}" for split in REQUIRED if split not in found]
    if missing:
        raise DatasetUnavailable(f"data.manual_dir={folder} must hold {' and '.join(missing)}")
    return found


def _content_name(files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for split, path in sorted(files.items()):
        h.update(split.encode())
        h.update(path.read_bytes())
    return "h" + h.hexdigest()[:16]


class _LocalFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    SUFFIX = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put train/validation/test files in a folder and pass data.manual_dir=FOLDER."

    def __init__(self, *, folder: Path, **kwargs):
        self.folder = Path(folder)
        self.files = _files(self.folder, self.SUFFIX)
        super().__init__(config=tfds.core.BuilderConfig(name=_content_name(self.files)), **kwargs)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(path) for split, path in self.files.items()}


class TextFiles(_LocalFiles, skip_registration=True):
    name = "text_files"
    SUFFIX = ".txt"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _generate_examples(self, path: Path):
        yield path.name, {"text": path.read_text(encoding="utf-8")}


class Jsonl(_LocalFiles, skip_registration=True):
    name = "jsonl"
    SUFFIX = ".jsonl"

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"prompt": tfds.features.Text(), "completion": tfds.features.Text()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _generate_examples(self, path: Path):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                example = {"prompt": row["prompt"], "completion": row["completion"]}
            except (ValueError, KeyError, TypeError):
                raise DatasetUnavailable(
                    f"{path}:{i + 1}: each line must be a JSON object with string fields prompt and completion"
                ) from None
            yield i, example


BUILDERS = {"text_files": TextFiles, "jsonl": Jsonl}
