"""Chat records: rendered as transformers renders the template, loss on exactly the assistant turns
(transformers' own assistant mask as the reference), EOS at the end, whole in a row, and bad records
named by where they are."""

import io
import json

import numpy as np
import pytest
import tokenizers
from test_data import Units

from podtrain.data import chat, pipeline, tokenizer, tokenizer_train
from podtrain.data.sources import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "A tiny model."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Nothing more."},
]
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# transformers' {% generation %} marks the assistant text: its assistant mask is the reference for ours
MARKED = (
    "{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def bpe(template: str | None, eos: str = "<|end|>") -> tokenizer.HFTokenizer:
    """A small byte-level BPE trained here, the chat specials added, the template in its config."""
    trained = tokenizer_train.train(["Who are you? A tiny model. And then? Nothing more. Be brief.\n"] * 20, 300)
    tok = tokenizers.Tokenizer.from_str(trained.files()[tokenizer.HF_FILE].decode())
    tok.add_special_tokens(SPECIALS)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        **({"chat_template": template} if template else {}),
    }
    return tokenizer.HFTokenizer(tok.to_str().encode(), json.dumps(config).encode())


def test_default_template_masks_each_assistant_reply_and_its_eos():
    tok = tokenizer.CharTokenizer("".join(sorted(set(chat.text(CHAT)))))
    ids, mask, nbytes = chat.encode(tok, CHAT)
    assert chat.render(tok, CHAT, add_generation_prompt=True).endswith("Nothing more.\n<|endoftext|>assistant: ")
    eos = np.flatnonzero(ids == tok.eos_id)
    assert tok.decode(ids) == chat.text(CHAT) and len(eos) == 2 and eos[-1] == len(ids) - 1
    # the loss covers each reply, its newline and the EOS after it, nothing else
    assert [tok.decode(ids[a : b + 1]) for a, b in _runs(mask)] == ["A tiny model.\n", "Nothing more.\n"]
    assert [ids[b] for _, b in _runs(mask)] == [tok.eos_id, tok.eos_id]
    assert nbytes == len("A tiny model.Nothing more.")  # the replies' text: what val_bpb divides by


def _runs(mask) -> list[tuple[int, int]]:
    """(first, last) index of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def test_template_renders_and_masks_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = bpe(MARKED)
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for msgs in (CHAT, CHAT[1:3], CHAT[:4]):  # two turns, one, one followed by a user turn
        out = theirs.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask, _ = chat.encode(tok, msgs)
        assert chat.render(tok, msgs) == theirs.apply_chat_template(msgs, tokenize=False)
        # every message ends with <|end|>, the EOS: nothing appended; after a user turn it does not count
        assert ids.tolist() == out["input_ids"] and ids[-1] == tok.eos_id
        assert mask.tolist() == [bool(m) for m in out["assistant_masks"]] and any(mask)
    prompt = chat.render(tok, CHAT[:2], add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False)


def test_eos_is_appended_and_counts_after_a_final_reply():
    tok = bpe("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}", eos="<|endoftext|>")
    ids, mask, _ = chat.encode(tok, CHAT)
    assert ids[-1] == tok.eos_id and mask[-1] and tok.decode(ids[-3:]) == "\n"  # <|end|>, \n, EOS: specials skipped
    assert (ids == tok.eos_id).sum() == 1
    ids, mask, _ = chat.encode(tok, CHAT[:4])  # after a user turn the EOS ends the example but does not count
    assert ids[-1] == tok.eos_id and not mask[-1] and mask.any()


def test_sentencepiece_special_tokens_in_the_template_become_their_ids():
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([chat.text(CHAT)] * 50), model_writer=model, vocab_size=60,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )  # fmt: skip
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = tokenizer.SentencePieceTokenizer(model.getvalue(), json.dumps({"chat_template": template}).encode())
    ids, mask, _ = chat.encode(tok, CHAT)
    assert ids[0] == tok.bos_id and (ids == tok.eos_id).sum() == len(CHAT) and ids[-1] == tok.eos_id
    replies = [*tok.encode("A tiny model."), tok.eos_id, *tok.encode("Nothing more."), tok.eos_id]
    assert ids[mask].tolist() == replies


def test_chats_pack_whole_with_their_weights_and_feed_texts():
    tok = tokenizer.CharTokenizer("".join(sorted(set(chat.text(CHAT)))))
    records = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    docs = pipeline.documents(tok, records, "text", "memory")
    assert docs["whole"].all() and len(docs["loss_mask"]) == len(docs["tokens"])
    n = [int(b - a) - 1 for a, b in zip(docs["starts"][:-1], docs["starts"][1:])]
    packer = pipeline._Packer(n[0] + 3, lambda k: docs if k == 0 else None)
    rows = [packer.row()[0] for _ in range(2)]
    assert rows[0]["segment_ids"].tolist() == [1] * n[0] + [0] * 3  # the second does not fit: a new row
    for row, (a, b), k in zip(rows, zip(docs["starts"][:-1], docs["starts"][1:]), n):
        np.testing.assert_array_equal(row["weights"][:k], docs["loss_mask"][a + 1 : b])
        np.testing.assert_array_equal(row["targets"][:k], docs["tokens"][a + 1 : b])
    assert list(pipeline.texts([pipeline.Input(Units([records]))])) == [chat.text(CHAT), chat.text(CHAT[1:3])]


@pytest.mark.parametrize(
    "messages, template, error",
    [
        ("hello", None, r"field 'messages' holds a str, not a list"),
        ([], None, r"holds an empty list"),
        ([{"role": "bot", "content": "hi"}], None, r"messages\[0\] has role 'bot'; roles are system, user, assistant"),
        ([{"role": "user", "content": 3}], None, r"messages\[0\] \(user\) has content 3, not text"),
        ([{"role": "user", "content": "hi"}], None, r"no assistant message in messages \(roles: user\)"),
        (CHAT, "{{ raise_exception('no system turns') }}", r"chat template failed on this conversation: no system"),
        (CHAT, "{{ messages[-1].content }}", r"assistant turn 2 cannot be located"),
        (CHAT, "{% for m in messages %}", r"chat template failed on this conversation"),
    ],
)
def test_bad_chats_name_the_record_and_what_is_wrong(messages, template, error):
    tok = bpe(template) if template else tokenizer.ByteTokenizer()
    with pytest.raises(DataError, match=f"^chats.jsonl:7: .*{error}"):
        pipeline.documents(tok, [{"messages": messages, "_where": "chats.jsonl:7"}], "text", "memory")
