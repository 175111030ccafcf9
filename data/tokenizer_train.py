"""`podtrain tokenizer train`: a tokenizer.json trained with the `tokenizers` trainers on the corpus.

bpe is byte-level BPE as Llama 3 ships it (its pre-tokenizer regex, then bytes as characters): every
text encodes, and decodes back exactly. unigram is a Unigram model over whitespace-marked words
(Metaspace, as SentencePiece marks them), with <unk> for characters training never saw. Both end
their vocabulary with EOS_TOKEN and write a tokenizer_config.json naming it, so
`transformers.AutoTokenizer.from_pretrained(out)` loads the folder with the same ids.
"""

import json
import os
import re
from collections.abc import Iterable, Iterator

from etils import epath
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from podtrain.data import pipeline
from podtrain.data.config import DataConfig
from podtrain.data.tokenizer import EOS_TOKEN, HFTokenizer

KINDS = ("bpe", "unigram")
UNK_TOKEN = "<unk>"
# Llama 3's pre-tokenizer: contractions, letters (with one leading non-letter), 1-3 digits, punctuation, spaces
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
MIN_VOCAB = {"bpe": 257, "unigram": 2}  # bpe: the 256 bytes and EOS; unigram: <unk> and EOS


def _train_documents(cfg: DataConfig) -> Iterator[str]:
    """The training documents (held-out ones excluded), streamed one at a time from the sources."""
    yield from pipeline.texts(pipeline.inputs(cfg)[0])


def paragraphs(text: str) -> Iterator[str]:
    """The pieces of `text` between blank lines, without the blank lines, in order."""
    start = 0
    for gap in re.finditer(r"\n[ \t]*\n\s*", text):
        if gap.start() > start:
            yield text[start : gap.start()]
        start = gap.end()
    if start < len(text):
        yield text[start:]


def new_tokenizer(kind: str, vocab_size: int, progress: bool = False) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer of `kind` and the trainer that fills it with `vocab_size` ids."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        return tok, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet, show_progress=progress
        )
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    return tok, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, UNK_TOKEN], unk_token=UNK_TOKEN, show_progress=progress
    )


def check_args(vocab_size: int, kind: str) -> None:
    """ValueError naming the flag, for a kind or size no tokenizer can have."""
    if kind not in KINDS:
        raise ValueError(f"--kind={kind!r} is not one of {', '.join(KINDS)}")
    if vocab_size < MIN_VOCAB[kind]:
        raise ValueError(f"--vocab-size={vocab_size} must be >= {MIN_VOCAB[kind]} for a {kind} tokenizer")


def train(documents: Iterable[str], vocab_size: int, kind: str = "bpe", progress: bool = False) -> HFTokenizer:
    """A `kind` tokenizer of at most `vocab_size` ids (specials included; fewer when the corpus has
    fewer distinct pieces) trained on `documents`, streamed through the trainer, never held together."""
    check_args(vocab_size, kind)
    tok, trainer = new_tokenizer(kind, vocab_size, progress)
    tok.train_from_iterator(documents, trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        **({"unk_token": UNK_TOKEN} if kind == "unigram" else {}),
    }
    return HFTokenizer(tok.to_str().encode(), (json.dumps(config, indent=2) + "\n").encode())


def train_to(cfg: DataConfig, vocab_size: int, out, kind: str = "bpe", progress: bool = False) -> HFTokenizer:
    """`train` on the configured corpus (`_train_documents`), saved into the new folder `out`
    (tokenizer.json, tokenizer_config.json): written beside it and renamed, so a failure leaves nothing."""
    check_args(vocab_size, kind)  # before the corpus is read
    out = epath.Path(out)
    tok = train(_train_documents(cfg), vocab_size, kind, progress)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tok.save(staging)
        if out.exists():
            out.rmdir()  # the caller checked it is empty
        staging.rename(out)
    finally:
        if staging.exists():
            staging.rmtree()
    return tok
