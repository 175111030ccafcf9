"""TFDS builder for tiny_shakespeare, written as ArrayRecord and preparable offline.

Same source file, feature and 90/5/5 train/validation/test split (by characters) as TFDS's own
`tiny_shakespeare`, without TensorFlow: the source comes from `manual_dir/input.txt` when that
file is there, else it is downloaded once (`fetch_source`). Each split is cut at blank lines into
speeches, one record each, in order: the documents a pipeline packs and ends with EOS, so
"\n\n".join of a split's records is the split's text.
"""

import hashlib
import urllib.request
from pathlib import Path

import tensorflow_datasets as tfds

from podtrain.data import DatasetUnavailable

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FILENAME = "input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class TinyShakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "tiny_shakespeare"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "One record per speech (the text between blank lines).", "1.0.0": "One record per split."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {FILENAME} from {URL} in the manual folder (data.manual_dir)."

    @staticmethod
    def fetch_source(manual_dir: str | None, cache_dir: Path) -> Path:
        """The folder holding a verified input.txt: `manual_dir`, else `cache_dir` (downloaded once).

        Called before TFDS starts preparing, so a missing source fails in seconds with nothing
        half-written: TFDS's own downloader retries 10 times with exponential back-off (minutes
        offline) and cannot be told not to, so the one small file is fetched here in one attempt.
        """
        for folder in ([Path(manual_dir)] if manual_dir else []) + [cache_dir]:
            if (folder / FILENAME).exists():
                _verify(folder / FILENAME, "data.manual_dir" if folder != cache_dir else "data.data_dir")
                return folder
        try:
            with urllib.request.urlopen(URL, timeout=30) as response:
                data = response.read()
        except OSError as e:  # no network, proxy refusal, DNS failure, timeout: all mean "give us the file"
            where = f"{manual_dir}/{FILENAME} does not exist and " if manual_dir else ""
            raise DatasetUnavailable(
                f"data.dataset=tiny_shakespeare needs {FILENAME} (sha256 {SHA256[:8]}…): {where}"
                f"downloading {URL} failed ({type(e).__name__}); put {FILENAME} in a folder and pass "
                f"data.manual_dir=FOLDER"
            ) from None
        if hashlib.sha256(data).hexdigest() != SHA256:
            raise DatasetUnavailable(
                f"{URL} served a file with the wrong sha256: put {FILENAME} in a folder and pass data.manual_dir=FOLDER"
            )
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache_dir / f"{FILENAME}.partial"
        partial.write_bytes(data)
        partial.replace(cache_dir / FILENAME)
        return cache_dir

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage=URL,
            disable_shuffling=True,  # records in key order: speeches in the order of the play
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        text = (dl_manager.manual_dir / FILENAME).read_text(encoding="utf-8")  # see fetch_source
        i = int(len(text) * 0.9)
        train, rest = text[:i], text[i:]
        j = int(len(rest) * 0.5)
        return {
            "train": self._generate_examples("train", train),
            "validation": self._generate_examples("validation", rest[:j]),
            "test": self._generate_examples("test", rest[j:]),
        }

    def _generate_examples(self, split: str, text: str):
        for i, speech in enumerate(text.split("\n\n")):
            yield f"{split}-{i:06d}", {"text": speech}


def _verify(path: Path, key: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise DatasetUnavailable(
            f"{key}: {path} has sha256 {digest[:8]}…, expected {SHA256[:8]}…: replace it with {URL}"
        )
