"""Tokenizers: ids equal to the reference libraries' (transformers, sentencepiece) on the whole
tiny-shakespeare validation split, exact decoding, save/load/pickle round trips, one-line errors."""

import io
import json
import os
import pickle

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece  # noqa: E402
import transformers  # noqa: E402

from podtrain.data import DatasetUnavailable, sources, tokenizer, tokenizer_train  # noqa: E402
from podtrain.data.config import DataConfig  # noqa: E402
from podtrain.launch import cli  # noqa: E402
from podtrain.model.config import resolved_vocab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shakespeare_char.yaml")
SAMPLE = "First Citizen:\nBefore we  proceed any further, hear me speak.\n\nAll: Speak, speak. 1234567 ok\n"


@pytest.fixture(scope="module")
def data(tfds_dir, shakespeare_dir) -> dict[str, str]:
    """{split: its whole text}: the speeches (one record each) joined at the blank lines that separate them."""
    cfg = DataConfig(manual_dir=str(shakespeare_dir), data_dir=str(tfds_dir))
    out = {}
    for split in ("train", "validation"):
        source = sources.open_source("tiny_shakespeare", split, cfg)
        out[split] = "\n\n".join(r["text"] for u in range(len(source)) for r in source.read(u))
    return out


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, tfds_dir, shakespeare_dir):
    """`podtrain tokenizer train` (BPE, 4096) on tiny shakespeare's train split."""
    out = tmp_path_factory.mktemp("bpe") / "tok"
    data = [f"data.manual_dir={shakespeare_dir}", f"data.data_dir={tfds_dir}"]
    assert cli.main(["tokenizer", "train", "--config", CONFIG, "--vocab-size", "4096", "--out", str(out), *data]) == 0
    return out


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory, data):
    """A SentencePiece unigram model trained by `sentencepiece` itself on the same train text, set up
    to be lossless (identity normalization, no dummy prefix, bytes for unseen characters)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(data["train"].splitlines()),
        model_writer=model,
        vocab_size=4096,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        minloglevel=2,
        num_threads=1,
    )
    path = tmp_path_factory.mktemp("sp") / "shakespeare.model"
    path.write_bytes(model.getvalue())
    return path


def test_trained_bpe_gives_transformers_ids_on_the_validation_split(bpe_dir, data):
    """Must show 1 (BPE): podtrain's ids == transformers.AutoTokenizer's on the trained folder, for the
    whole validation split as one text and document by document; both decode it back exactly."""
    val = data["validation"]
    ours, theirs = tokenizer.load(bpe_dir), transformers.AutoTokenizer.from_pretrained(bpe_dir)
    assert (ours.kind, ours.vocab_size, ours.eos_id) == ("hf", 4096, theirs.eos_token_id)
    ids = ours.encode(val)
    assert ids.tolist() == theirs(val, add_special_tokens=False)["input_ids"]
    assert ours.prompt(val).tolist() == theirs(val)["input_ids"]
    docs = list(tokenizer_train.paragraphs(val))
    batch = theirs(docs, add_special_tokens=False)["input_ids"]
    assert [d.tolist() for d in ours.encode_batch(docs)] == batch
    assert ours.decode(ids) == val == theirs.decode(ids.tolist())
    compared = len(ids) + sum(map(len, batch))
    print(
        f"BPE 4096: {len(ids)} ids over {len(val)} characters + {sum(map(len, batch))} ids in {len(docs)} "
        f"documents, {compared} compared, all equal to transformers; decode exact"
    )
    assert len(ids) < len(val) / 2  # trained merges at work, not characters


def test_sentencepiece_model_gives_sentencepiece_ids_on_the_validation_split(sp_file, data):
    """Must show 1 (SentencePiece): podtrain's ids == sentencepiece's for the whole validation split;
    decode round trips exactly."""
    val = data["validation"]
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
    ours = tokenizer.load(sp_file)
    assert (ours.kind, ours.vocab_size) == ("sentencepiece", 4096)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (reference.bos_id(), reference.eos_id(), None, True)
    ids = ours.encode(val)
    assert ids.tolist() == reference.encode(val)
    docs = list(tokenizer_train.paragraphs(val))
    assert [d.tolist() for d in ours.encode_batch(docs)] == reference.encode(docs)
    assert ours.decode(ids) == val == reference.decode(ids.tolist())
    print(f"SentencePiece 4096: {len(ids)} ids over {len(val)} characters, equal to sentencepiece; decode exact")
    first = ours.documents(docs[:1])[0]
    assert first[0] == ours.bos_id and first[-1] == ours.eos_id and first[1:-1].tolist() == reference.encode(docs[0])


def test_load_from_a_folder_or_a_file(bpe_dir, sp_file, tmp_path):
    bpe = tokenizer.load(bpe_dir)
    assert tokenizer.load(bpe_dir / "tokenizer.json") == bpe
    assert tokenizer.load(str(bpe_dir)).encode(SAMPLE).tolist() == bpe.encode(SAMPLE).tolist()
    sp = tokenizer.load(sp_file)
    sp.save(tmp_path / "sp")
    assert sorted(os.listdir(tmp_path / "sp")) == ["tokenizer.model"]
    assert tokenizer.load(tmp_path / "sp") == sp
    assert (tmp_path / "sp" / "tokenizer.model").read_bytes() == sp_file.read_bytes()
    char = tokenizer.CharTokenizer.from_texts([SAMPLE])
    char.save(tmp_path / "char")
    assert tokenizer.load(tmp_path / "char") == char == tokenizer.load(tmp_path / "char" / "podtrain.json")
    assert tokenizer.load(tmp_path / "char") != tokenizer.CharTokenizer.from_texts([SAMPLE + "~"])


def test_save_writes_the_library_files_and_the_fingerprint_hashes_them(bpe_dir, tmp_path):
    bpe = tokenizer.load(bpe_dir)
    bpe.save(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (bpe_dir / name).read_bytes()
    assert tokenizer.load(tmp_path / "again").fingerprint == bpe.fingerprint
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = "!"
    (tmp_path / "again" / "tokenizer_config.json").write_text(json.dumps(config))
    other = tokenizer.load(tmp_path / "again")
    assert other.fingerprint != bpe.fingerprint and other.eos_id == other._tok.token_to_id("!")


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "sentencepiece"])
def test_pickling_round_trips(kind, bpe_dir, sp_file):
    tok = {
        "char": lambda: tokenizer.CharTokenizer.from_texts([SAMPLE]),
        "byte": tokenizer.ByteTokenizer,
        "bpe": lambda: tokenizer.load(bpe_dir),
        "sentencepiece": lambda: tokenizer.load(sp_file),
    }[kind]()
    again = pickle.loads(pickle.dumps(tok))
    assert again == tok and again.spec() == tok.spec()
    np.testing.assert_array_equal(again.encode(SAMPLE), tok.encode(SAMPLE))
    docs = [SAMPLE, "speak"]
    assert [d.tolist() for d in again.documents(docs)] == [d.tolist() for d in tok.documents(docs)]
    assert again.decode(tok.encode(SAMPLE)) == SAMPLE


def test_encode_cli_prints_one_json_list(bpe_dir, tmp_path, capsys):
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(bpe_dir), "--text", SAMPLE]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == tokenizer.load(bpe_dir).encode(SAMPLE).tolist()
    (tmp_path / "in.txt").write_text(SAMPLE, encoding="utf-8")
    file = ["--file", str(tmp_path / "in.txt")]
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(bpe_dir / "tokenizer.json"), *file]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out)


def assert_one_line_error(capsys, *needles: str) -> None:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in captured.err, captured.err


def test_bad_tokenizer_inputs_exit_2_in_one_line(tmp_path, bpe_dir, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')  # truncated
    (tmp_path / "bad.model").write_bytes(b"\x00not a sentencepiece model")
    (tmp_path / "empty").mkdir()
    encode = ["tokenizer", "encode", "--text", "hi", "--tokenizer"]
    for path, needle in [
        (tmp_path / "bad", "not a readable tokenizer.json"),
        (tmp_path / "bad.model", "not a readable SentencePiece"),
        (tmp_path / "empty", "holds no podtrain.json, tokenizer.json or tokenizer.model"),
        (tmp_path / "missing", "no such file or folder"),
    ]:
        assert cli.main([*encode, str(path)]) == 2
        assert_one_line_error(capsys, str(path), needle)
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(bpe_dir)]) == 2
    assert_one_line_error(capsys, "exactly one of --text")
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(bpe_dir), "--text", "a", "--file", "b"]) == 2
    assert_one_line_error(capsys, "exactly one of --text")
    with pytest.raises(DatasetUnavailable, match="data.tokenizer="):
        tokenizer.from_config(str(tmp_path / "bad"), lambda: [])


def test_tokenizer_train_refuses_bad_arguments_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    train = ["tokenizer", "train", "--config", CONFIG, "data.data_dir=/nonexistent"]  # never read: checks come first
    for args, needle in [
        (["--vocab-size", "0", "--out", str(tmp_path / "new")], "--vocab-size=0 must be >= 257"),
        (["--vocab-size", "-5", "--kind", "unigram", "--out", str(tmp_path / "new")], "--vocab-size=-5"),
        (["--vocab-size", "300", "--kind", "wordpiece", "--out", str(tmp_path / "new")], "--kind='wordpiece'"),
        (["--vocab-size", "300", "--out", str(tmp_path / "out")], "exists and is not empty"),
    ]:
        assert cli.main([*train, *args]) == 2
        assert_one_line_error(capsys, needle)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["keep.txt"]


def test_unigram_training_streams_documents_and_round_trips():
    seen = []

    def documents():
        for i in range(300):
            seen.append(i)
            yield f"Document {i}: to be, or not to be, that is the question {i % 7}.\n"

    tok = tokenizer_train.train(documents(), 200, kind="unigram")
    assert seen == list(range(300)) and tok.vocab_size <= 200
    text = "to be, or not to be: Document 12\n"
    assert tok.decode(tok.encode(text)) == text and tok.eos_id == 0 and not tok.add_bos


def test_char_and_byte_have_an_eos_after_their_ids(tmp_path):
    char = tokenizer.from_config("char", lambda: iter(["ba", "c\n"]))
    assert (char.chars, char.vocab_size, char.eos_id, char.bos_id) == ("\nabc", 5, 4, None)
    assert [d.tolist() for d in char.documents(["ab", ""])] == [[1, 2, 4], [4]]
    assert char.decode([2, 4, 1, 99]) == "ba"  # EOS and ids past the vocabulary are skipped
    byte = tokenizer.from_config("byte", lambda: pytest.fail("byte reads no corpus"))
    assert (byte.vocab_size, byte.eos_id) == (257, 256)
    assert byte.documents(["é"])[0].tolist() == [0xC3, 0xA9, 256] and byte.decode([0xC3, 0xA9, 256]) == "é"
    spec = {"kind": "byte", "vocab_size": 257, "bos_id": None, "eos_id": 256, "fingerprint": byte.fingerprint}
    assert byte.spec() == spec


def test_char_tokenizer_round_trips_the_corpus(data, tmp_path):
    corpus = "".join(data.values())
    tok = tokenizer.CharTokenizer.from_texts(data.values())
    assert (tok.vocab_size, tok.eos_id) == (66, 65)  # tiny-shakespeare's 65 characters, then EOS
    ids = tok.encode(corpus)
    assert ids.min() == 0 and ids.max() == tok.eos_id - 1
    assert tok.decode(ids) == corpus
    tokenizer.save_run(tok, tmp_path)
    loaded = tokenizer.load_run(tmp_path)
    assert loaded == tok
    np.testing.assert_array_equal(loaded.encode(corpus[:5000]), ids[:5000])


def test_char_tokenizer_non_ascii_unordered_and_unknown_characters(tmp_path):
    text = 'naïve café — Ωμέγα 世界 🙂\n\t"quoted"\\'
    tok = tokenizer.CharTokenizer.from_texts([text])
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert tokenizer.load(tmp_path).decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary: 'xyz'"):
        tok.encode("zyx")
    assert tokenizer.CharTokenizer("ba|").encode("a|b").tolist() == [1, 2, 0]


def test_byte_tokenizer_round_trips_non_ascii(tmp_path):
    text = "To be, or not — naïve Ωμέγα 世界 🙂\x00\n"
    tok = tokenizer.ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert tok.decode(ids) == text
    tok.save(tmp_path)
    loaded = tokenizer.load(tmp_path)
    assert loaded == tok and loaded.decode(loaded.encode(text)) == text


def plain_bpe():
    """A byte-level BPE trained on SAMPLE with no special tokens at all."""
    from tokenizers import trainers

    tok = tokenizer_train.new_tokenizer("bpe", 300)[0]
    tok.train_from_iterator([SAMPLE] * 3, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return tok


def llama_style(tmp_path, config: dict | None):
    """A tokenizer.json whose post-processor prepends BOS (as Llama 3's), with or without a config."""
    from tokenizers import processors

    tok = plain_bpe()
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return bos, tok.token_to_id("<|end_of_text|>")


def test_bos_from_the_post_processor_and_eos_from_common_names(tmp_path):
    bos, eos = llama_style(tmp_path / "bare", None)
    tok = tokenizer.load(tmp_path / "bare")
    assert (tok.bos_id, tok.add_bos, tok.eos_id, tok.chat_template) == (bos, True, eos, None)
    assert tok.documents(["hear"])[0].tolist() == [bos, *tok.encode("hear").tolist(), eos]
    tok.save(tmp_path / "saved")  # a tokenizer_config.json is written so that transformers knows the specials
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert theirs(SAMPLE)["input_ids"] == tok.prompt(SAMPLE).tolist() and theirs.eos_token_id == eos
    assert tokenizer.load(tmp_path / "saved").spec() == tok.spec()

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {"eos_token": {"content": "<|begin_of_text|>"}, "bos_token": None, "chat_template": template}
    llama_style(tmp_path / "configured", config)
    tok = tokenizer.load(tmp_path / "configured")
    assert (tok.eos_id, tok.bos_id, tok.add_bos, tok.chat_template) == (bos, None, False, template)


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    tok = plain_bpe()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DatasetUnavailable, match="no end-of-text token"):
        tokenizer.load(tmp_path)


def test_vocab_size_0_rounds_the_tokenizer_up_to_vocab_multiple():
    assert resolved_vocab(66, 0, 128) == 128
    assert resolved_vocab(128, 0, 128) == 128
    assert resolved_vocab(129, 0, 128) == 256
    assert resolved_vocab(66, 0, 1) == 66
    assert resolved_vocab(66, 70, 128) == 70  # an explicit size is kept as it is
    with pytest.raises(ValueError, match="model.vocab_size=60 is smaller than the tokenizer's 66 ids"):
        resolved_vocab(66, 60, 128)
