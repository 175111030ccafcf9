"""Tokenizers behind one interface: char, byte, Hugging Face `tokenizers` JSON and SentencePiece.

Every kind saves the files its own library reads (tokenizer.json + tokenizer_config.json,
tokenizer.model, or podtrain.json for char and byte), so a run's tokenizer/ folder loads in
`transformers` or `sentencepiece` as it is; the fingerprint is a hash of exactly those bytes.
The library objects are rebuilt from those bytes when pickled (Grain worker processes).

Ids are 0 .. vocab_size - 1 with the special tokens included. Every kind has an EOS id, appended to
each document; char's is the id after its characters, byte's is 256.
"""

import functools
import hashlib
import json
from collections.abc import Callable, Iterable

import numpy as np
import sentencepiece
import tokenizers
from etils import epath

from podtrain.data import DatasetUnavailable

EOS_TOKEN = "<|endoftext|>"  # the EOS of trained tokenizers and of char/byte tokenizers exported for transformers
# where tokenizer_config.json names no EOS: the names Llama 3, Llama 2 / Mistral, GPT-2 / Qwen and Gemma use
EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
OURS, HF_FILE, HF_CONFIG, SP_FILE, TEMPLATE_FILE = (
    "podtrain.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "chat_template.jinja",
)
RUN_FOLDER = "tokenizer"  # run_dir/tokenizer/ holds the run's tokenizer files
FIX = "pass char, byte, or a folder or file holding tokenizer.json, tokenizer.model or podtrain.json"


def _ids(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


class Tokenizer:
    """The interface every kind implements; see the module docstring."""

    kind: str
    vocab_size: int
    eos_id: int
    bos_id: int | None = None
    add_bos: bool = False  # the tokenizer's own convention prepends BOS (what transformers' tokenizer(text) does)
    pad_id: int | None = None
    chat_template: str | None = None

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, no special tokens."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def documents(self, texts: list[str]) -> list[np.ndarray]:
        """[BOS if add_bos] + ids + [EOS] of each text: what a document is in training."""
        head = _ids([self.bos_id] if self.add_bos else [])
        return [np.concatenate([head, ids, _ids([self.eos_id])]) for ids in self.encode_batch(texts)]

    def prompt(self, text: str) -> np.ndarray:
        """[BOS if add_bos] + ids: what transformers' tokenizer(text) gives, and what sampling feeds."""
        return np.concatenate([_ids([self.bos_id] if self.add_bos else []), self.encode(text)])

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special tokens' text by transformers' names (bos_token, eos_token, pad_token, unk_token):
        the variables a chat template reads, and text a rendered chat turns into their ids (data/chat.py).
        Char and byte: EOS_TOKEN, the EOS name their exports give transformers."""
        return {"eos_token": EOS_TOKEN}

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens and ids past the vocabulary (padding rows of the embedding) are skipped."""
        return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """{file name: bytes} that `save` writes."""
        raise NotImplementedError

    def save(self, folder) -> None:
        folder = epath.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (folder / name).write_bytes(data)

    @functools.cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, data in sorted(self.files().items()):
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()

    def spec(self) -> dict:
        """What a checkpoint records of its tokenizer (the files themselves live in run_dir/tokenizer/)."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "fingerprint": self.fingerprint,
        }

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and (self.kind, self.fingerprint) == (other.kind, other.fingerprint)

    def __hash__(self) -> int:
        return hash((self.kind, self.fingerprint))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"


class CharTokenizer(Tokenizer):
    """One id per character, in the order given (code-point order when built from text), then EOS."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size, self.eos_id = len(chars) + 1, len(chars)
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._order = np.argsort(codes).astype(np.int32)
        self._sorted = codes[self._order]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        """The characters of `texts`, read one text at a time."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        at = np.minimum(np.searchsorted(self._sorted, codes), max(len(self._sorted) - 1, 0))
        known = self._sorted[at] == codes if len(self._sorted) else np.zeros(len(codes), bool)
        if not known.all():
            unknown = "".join(sorted({chr(c) for c in codes[~known]}))
            raise ValueError(f"characters not in the tokenizer's vocabulary: {unknown!r}")
        return self._order[at]

    def _decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != self.eos_id)

    def files(self) -> dict[str, bytes]:
        return {OURS: json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=False).encode()}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: byte b is id b; EOS is 256."""

    kind = "byte"
    vocab_size, eos_id = 257, 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def _decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def files(self) -> dict[str, bytes]:
        return {OURS: json.dumps({"kind": self.kind}).encode()}


def _transformers_config(fields: dict) -> bytes:
    """tokenizer_config.json bytes for `transformers.AutoTokenizer` with these special tokens."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **fields}
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()


def _template(config: dict) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named ones (the 'default')."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (BPE, Unigram, WordPiece, byte-level) and the
    tokenizer_config.json beside it, if any, which names the special tokens and the chat template."""

    kind = "hf"

    def __init__(self, tokenizer_json: bytes, config_json: bytes | None = None, template: bytes | None = None):
        self._json, self._config_json, self._template_file = tokenizer_json, config_json, template
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        config = json.loads(config_json) if config_json else {}
        if not isinstance(config, dict):
            raise ValueError(f"{HF_CONFIG} is not a JSON object")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError("the vocabulary is empty")
        self.vocab_size = max(vocab.values()) + 1
        eos = self._special(config, "eos_token")
        eos = eos if eos is not None else next((vocab[n] for n in EOS_NAMES if n in vocab), None)
        if eos is None:
            raise ValueError(
                f"no end-of-text token (tokenizer_config.json names no eos_token and the vocabulary has none of "
                f"{', '.join(EOS_NAMES)}); set eos_token in {HF_CONFIG}"
            )
        self.eos_id = eos
        self.bos_id, self.pad_id = self._special(config, "bos_token"), self._special(config, "pad_token")
        # what the post-processor adds around a text (Llama: BOS; GPT-2: nothing; T5-like: EOS after)
        around = self._tok.encode("", add_special_tokens=True).ids
        if self.bos_id is None and around and around[0] != self.eos_id:
            self.bos_id = around[0]
        self.add_bos = bool(around) and around[0] == self.bos_id
        self.chat_template = template.decode("utf-8") if template else _template(config)
        self._unk_id = self._special(config, "unk_token")

    def _special(self, config: dict, key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id, "unk_token": self._unk_id}
        return {k: self._tok.id_to_token(i) for k, i in ids.items() if i is not None}

    def _default_config(self) -> bytes:
        """A tokenizer_config.json that lets `transformers.AutoTokenizer` load tokenizer.json as it is."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return _transformers_config({k: self._tok.id_to_token(i) for k, i in ids.items() if i is not None})

    def encode(self, text: str) -> np.ndarray:
        return _ids(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [_ids(e.ids) for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def files(self) -> dict[str, bytes]:
        out = {HF_FILE: self._json, HF_CONFIG: self._config_json or self._default_config()}
        return out | ({TEMPLATE_FILE: self._template_file} if self._template_file else {})

    def __reduce__(self):
        return type(self), (self._json, self._config_json, self._template_file)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (tokenizer.model); BOS, EOS and padding ids come from the model."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, config_json: bytes | None = None):
        self._proto, self._config_json = model_proto, config_json
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        if self.vocab_size == 0:
            raise ValueError("the model has no pieces")
        if self._sp.eos_id() < 0:
            raise ValueError("the model has no EOS piece (trained with eos_id=-1); retrain it with an eos_id")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.add_bos = self.bos_id is not None
        self.chat_template = _template(json.loads(config_json)) if config_json else None

    @property
    def special_tokens(self) -> dict[str, str]:
        ids = {
            "bos_token": self.bos_id,
            "eos_token": self.eos_id,
            "pad_token": self.pad_id,
            "unk_token": self._sp.unk_id(),
        }
        return {k: self._sp.id_to_piece(i) for k, i in ids.items() if i is not None and i >= 0}

    def encode(self, text: str) -> np.ndarray:
        return _ids(self._sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [_ids(ids) for ids in self._sp.encode(list(texts))]

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def files(self) -> dict[str, bytes]:
        return {SP_FILE: self._proto} | ({HF_CONFIG: self._config_json} if self._config_json else {})

    def transformers_config(self) -> bytes:
        """tokenizer_config.json for exports: the model's own when it came with one, else one with
        which `transformers.AutoTokenizer` gives our ids (BOS added as the model's bos_id says)."""
        if self._config_json:
            return self._config_json
        ids = {
            "bos_token": self.bos_id,
            "eos_token": self.eos_id,
            "pad_token": self.pad_id,
            "unk_token": self._sp.unk_id(),
        }
        pieces = {k: self._sp.id_to_piece(i) for k, i in ids.items() if i is not None and i >= 0}
        return _transformers_config({**pieces, "add_bos_token": self.add_bos, "add_eos_token": False})

    def __reduce__(self):
        return type(self), (self._proto, self._config_json)


def from_config(spec: str, train_texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """data.tokenizer's tokenizer: 'char' over the characters of train_texts() (called only for char,
    read one text at a time), 'byte', or a tokenizer file or folder (`load`)."""
    if spec == "char":
        return CharTokenizer.from_texts(train_texts())
    if spec == "byte":
        return ByteTokenizer()
    return load(spec, f"data.tokenizer={spec}")


def _read(path: epath.Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def load(path, where: str | None = None, fix: str = FIX) -> Tokenizer:
    """The tokenizer in a file or folder, local or gs://. A folder holds podtrain.json (char or
    byte), tokenizer.json (with tokenizer_config.json beside it, if any) or tokenizer.model.

    A missing or unreadable tokenizer raises DatasetUnavailable, one line starting with `where`
    (the user's input, e.g. 'data.tokenizer=PATH'; default: the path) and ending with `fix`.
    """
    where = where or str(path)
    path = epath.Path(path)
    if path.is_dir():
        found = next((path / name for name in (OURS, HF_FILE, SP_FILE) if (path / name).exists()), None)
        if found is None:
            raise DatasetUnavailable(f"{where}: the folder holds no {OURS}, {HF_FILE} or {SP_FILE}; {fix}")
        path = found
    elif not path.exists():
        raise DatasetUnavailable(f"{where}: no such file or folder; {fix}")
    try:
        data = path.read_bytes()
        if path.name == OURS:
            return _ours(json.loads(data))
        if path.suffix == ".json":
            return HFTokenizer(data, _read(path.parent / HF_CONFIG), _read(path.parent / TEMPLATE_FILE))
        return SentencePieceTokenizer(data, _read(path.parent / HF_CONFIG))
    except Exception as e:  # each library raises its own types for a file it cannot parse
        what = "podtrain.json" if path.name == OURS else "tokenizer.json" if path.suffix == ".json" else "SentencePiece"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        file = "" if str(path) == where else f"{path} "
        raise DatasetUnavailable(f"{where}: {file}is not a readable {what} tokenizer ({reason}); {fix}") from None


def _ours(spec: dict) -> Tokenizer:
    if spec.get("kind") == "char" and isinstance(spec.get("chars"), str):
        return CharTokenizer(spec["chars"])
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown kind {spec.get('kind')!r} (expected char or byte)")


def save_run(tok: Tokenizer, run_dir) -> None:
    tok.save(epath.Path(run_dir) / RUN_FOLDER)


def load_run(run_dir) -> Tokenizer | None:
    """The run's tokenizer (run_dir/tokenizer/), or None for a run without one (an imported model
    that came without tokenizer files)."""
    folder = epath.Path(run_dir) / RUN_FOLDER
    return load(folder, str(folder), "restore the run's tokenizer files") if folder.exists() else None
