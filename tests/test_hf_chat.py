"""A chat model's round trip through transformers, all through the CLI: a tiny Llama made with
`transformers` and a tokenizer.json trained here (with a chat template) -> `podtrain import` ->
`sample` -> `finetune` on chat JSONL -> `export --format hf` -> transformers' greedy text equals
`podtrain sample --temperature 0`, and the exported tokenizer gives podtrain's ids."""

import collections
import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from podtrain.data import chat, tokenizer, tokenizer_train  # noqa: E402
from podtrain.launch import cli  # noqa: E402

SPECIALS = ["<|begin_of_text|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Llama 3 Instruct's shape: BOS, then per message a role header, the content and the end-of-turn
# token, which is also the EOS (generation stops there)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SEQ_LEN, NEW, SPEAKERS = 128, 24, 8


def chat_tokenizer(directory, text: str) -> transformers.PreTrainedTokenizerFast:
    """podtrain's byte-level BPE trained on `text`, the chat specials added, saved by transformers."""
    from tokenizers import Tokenizer

    trained = tokenizer_train.train(tokenizer_train.paragraphs(text), 512)
    tok = Tokenizer.from_str(trained.files()[tokenizer.HF_FILE].decode())
    tok.add_special_tokens(SPECIALS)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end|>"
    )
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(directory)
    return hf_tok


def tiny_llama(directory, hf_tok) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


def conversations(text: str, n: int, seed: int) -> list[dict]:
    """Tiny 'who says this line?' chats from the speeches of the play's SPEAKERS most frequent
    speakers; some with a system turn, some two rounds."""
    speeches = re.findall(r"^([A-Z][A-Za-z ]+):\n(.+)$", text, flags=re.M)
    top = {name for name, _ in collections.Counter(s for s, _ in speeches).most_common(SPEAKERS)}
    speeches = [(s, line) for s, line in speeches if s in top]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "Name who speaks."}] if rng.random() < 0.5 else []
        for _ in range(1 + int(rng.random() < 0.3)):
            speaker, line = speeches[int(rng.integers(len(speeches)))]
            msgs += [{"role": "user", "content": f"Who says: {line}"}, {"role": "assistant", "content": f"{speaker}."}]
        out.append({"messages": msgs})
    return out


def run_cli(capsys, *args) -> str:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def show(capsys, line: str) -> None:
    """A figure on the terminal (pytest -s), past capsys, which the CLI's output goes to."""
    with capsys.disabled():
        print(line)


def podtrain_greedy(capsys, run, prompt: str) -> str:
    out = run_cli(capsys, "sample", "--run", run, "--prompt", prompt, "--max-new-tokens", NEW, "--temperature", 0)
    return out[:-1]  # print's newline


def hf_greedy(model_dir, hf_tok, msgs) -> tuple[list[int], str, list[int]]:
    """(prompt ids, prompt text + greedy continuation, new ids) in transformers, from the chat template."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    x = torch.as_tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)
    prompt = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    new = out[0, len(ids) :].tolist()
    return list(ids), prompt + hf_tok.decode(new, skip_special_tokens=True), new


def question(conversation: dict) -> list[dict]:
    """The messages before the first assistant turn: [system,] user."""
    msgs = conversation["messages"]
    return msgs[: [m["role"] for m in msgs].index("assistant")]


@pytest.mark.slow
def test_chat_finetune_of_an_imported_llama_exports_what_transformers_generates(tmp_path, shakespeare_dir, capsys):
    text = (shakespeare_dir / "input.txt").read_text(encoding="utf-8")
    llama = tmp_path / "llama"
    hf_tok = chat_tokenizer(llama, text[:300_000])
    tiny_llama(llama, hf_tok)
    run, ft, hf_out = tmp_path / "run", tmp_path / "ft", tmp_path / "hf"

    run_cli(capsys, "import", "--hf", llama, "--out", run, f"data.seq_len={SEQ_LEN}")
    tok = tokenizer.load_run(run)
    assert (tok.kind, tok.chat_template, tok.eos_id) == ("hf", TEMPLATE, hf_tok.eos_token_id)
    held = conversations(text[int(len(text) * 0.9) :], 60, seed=1)
    prompt = chat.render(tok, question(held[0]), add_generation_prompt=True)
    before = podtrain_greedy(capsys, run, prompt)
    ids, theirs, _ = hf_greedy(llama, hf_tok, question(held[0]))
    assert tok.prompt(prompt).tolist() == ids
    show(capsys, f"imported, greedy: {before!r}")
    assert before == theirs

    data = tmp_path / "chat"
    data.mkdir()
    for name, rows in (("train", conversations(text[: int(len(text) * 0.9)], 400, 0)), ("validation", held)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli(
        capsys,
        "finetune",
        "--config",
        run / "config.yaml",
        f"finetune.init_from={run}",
        f"data.dataset={data}/train.jsonl",
        f"data.validation={data}/validation.jsonl",
        "data.eval_batches=4",
        f"run.dir={ft}",
        "train.steps=40",
        "train.eval_every=10",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.warmup_steps=4",
        "train.log_every=10",
        "train.peak_flops=1e11",
        "mesh.devices=1",
        "run.progress=false",
    )
    evals = [r["val_loss"] for r in map(json.loads, (ft / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    show(
        capsys,
        f"chat fine-tune val_loss: first {evals[0]:.3f} last {evals[-1]:.3f} (all {[round(v, 3) for v in evals]})",
    )
    assert evals[-1] < evals[0] - 1.0

    run_cli(capsys, "export", ft, "--out", hf_out, "--format", "hf")
    again = transformers.AutoTokenizer.from_pretrained(hf_out)
    for conversation in held[:3]:
        prompt = chat.render(tok, question(conversation), add_generation_prompt=True)
        ours = podtrain_greedy(capsys, ft, prompt)
        ids, theirs, new = hf_greedy(hf_out, again, question(conversation))
        show(capsys, f"fine-tuned, podtrain sample --temperature 0: {ours!r}")
        show(capsys, f"fine-tuned, transformers generate greedy:    {theirs!r}")
        assert tok.prompt(prompt).tolist() == ids
        assert ours == theirs and len(ours) > len(prompt)
        assert new[-1] == tok.eos_id and len(new) < NEW  # the reply ends with EOS: the model learned to stop

    sample = text[-2000:]
    assert again(sample)["input_ids"] == tok.prompt(sample).tolist()
    assert again(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample).tolist()
    for conversation in held[:20]:
        msgs = conversation["messages"]
        rendered = again.apply_chat_template(msgs, tokenize=False)
        assert rendered == chat.render(tok, msgs)
        ids, _, _ = chat.encode(tok, msgs)
        assert again.apply_chat_template(msgs, tokenize=True, return_dict=False) == ids.tolist()  # ends with EOS
        assert again(rendered, add_special_tokens=False)["input_ids"] == tok.encode(rendered).tolist()
