"""Export to / import from Hugging Face `transformers`, checked against transformers itself (fp32)."""

import collections
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from podtrain.data import tokenizer  # noqa: E402
from podtrain.inference import weights  # noqa: E402
from podtrain.interop import export  # noqa: E402
from podtrain.launch import cli  # noqa: E402
from podtrain.train import config as configs  # noqa: E402
from podtrain.train.config import ConfigError  # noqa: E402

from conftest import heldout_data, heldout_folder  # noqa: E402

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # 65 characters
TOL = 1e-5


def assert_logits_match(theirs, ours, what: str) -> None:
    """max |transformers - podtrain| <= TOL (fp32); the figure is printed (pytest -s)."""
    diff = float(np.abs(np.asarray(theirs) - np.asarray(ours)).max())
    print(f"{what}: max abs logit diff {diff:.3g} (logits up to {float(np.abs(ours).max()):.3g})")
    np.testing.assert_allclose(theirs, ours, atol=TOL, rtol=0)


def random_run(run_dir, tok=None, seed=0, moe=None, **model) -> tuple[configs.Config, dict, dict]:
    """A run dir with random weights (norm scales and router biases too, so a misplaced one shows)."""
    tok = tok or tokenizer.CharTokenizer(CHARS)
    model = {
        "vocab_size": 67,
        "num_layers": 3,
        "d_model": 48,
        "num_heads": 6,
        "num_kv_heads": 3,
        "mlp_dim": 37,
        "rope_theta": 500.0,
        "norm_eps": 1e-6,
        "init_std": 0.2,
        "moe": moe or {},
        **model,
    }
    sections = {"model": model, "data": {"tokenizer": tok.kind, "seq_len": 32}, "run": {"dir": str(run_dir)}}
    cfg = configs.from_dict(sections)
    _, abstract_params, abstract_buffers = weights.abstract_trees(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    keys = jax.random.split(jax.random.key(seed), len(leaves) + 1)
    params = jax.tree.unflatten(
        treedef,
        [
            np.asarray((1.0 if path[-1].key == "scale" else 0.0) + 0.2 * jax.random.normal(k, x.shape), np.float32)
            for k, (path, x) in zip(keys, leaves)
        ],
    )
    # router biases >= 0 (see hf.check_router_bias), large enough to change which experts win
    buffers = jax.tree.map(
        lambda x: np.asarray(jax.random.uniform(keys[-1], x.shape, maxval=0.5), np.float32), abstract_buffers
    )
    export.write_run(cfg, tok, params, buffers, run_dir)
    return cfg, params, buffers


def podtrain_logits(cfg, params, buffers, tokens_BT) -> np.ndarray:
    graphdef, _, _ = weights.abstract_trees(cfg)
    to_jax = lambda tree: jax.tree.map(jax.numpy.asarray, tree)
    logits, _ = nnx.merge(graphdef, to_jax(params), to_jax(buffers))(jax.numpy.asarray(tokens_BT))
    return np.asarray(logits)


def assert_same_tensors(path_a, path_b) -> None:
    """The two safetensors files hold the same names with bitwise-equal tensors of the same dtype."""
    original, again = load_file(path_a), load_file(path_b)
    assert original.keys() == again.keys()
    for name in original:
        assert original[name].dtype == again[name].dtype and original[name].tobytes() == again[name].tobytes(), name


def hf_logits(directory, tokens_BT) -> np.ndarray:
    # eager experts: a plain loop over experts (torch's grouped_mm on CPU needs 16-byte strides,
    # which the deliberately odd expert widths here do not have)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager"
    )
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens_BT), dtype=torch.long)).logits.numpy()


def tokens(cfg, seed=1, shape=(2, 19)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.model.vocab_size, shape)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_matches_transformers_logits(tmp_path, tie):
    cfg, params, buffers = random_run(tmp_path / "run", tie_embeddings=tie)
    out = export.export(tmp_path / "run", tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tie
    ids = tokens(cfg)
    ours, theirs = podtrain_logits(cfg, params, buffers, ids), hf_logits(out, ids)
    assert np.abs(ours).max() > 1.0  # logits far from zero: the comparison means something
    assert_logits_match(theirs, ours, f"export dense {'tied' if tie else 'untied'}")


def test_sharded_export_loads_in_transformers(tmp_path):
    cfg, params, buffers = random_run(tmp_path / "run", tie_embeddings=False)
    out = export.export(tmp_path / "run", tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (out / "model.safetensors").exists()
    assert all(os.path.getsize(out / f) < 20_000 + 4096 for f in files)  # + header
    ids = tokens(cfg)
    assert_logits_match(hf_logits(out, ids), podtrain_logits(cfg, params, buffers, ids), "export sharded")


@pytest.mark.parametrize("tok", [tokenizer.CharTokenizer(CHARS), tokenizer.ByteTokenizer()], ids=["char", "byte"])
def test_exported_tokenizer_round_trips_our_ids(tmp_path, tok):
    random_run(tmp_path / "run", tok=tok, vocab_size=tok.vocab_size, num_layers=1)
    out = export.export(tmp_path / "run", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "First Citizen:\nBefore we  proceed any further, hear me speak.\n\n"
    if tok.kind == "byte":
        text += "Ünïcödé — ok ✓"
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text).tolist()
    assert hf_tok.decode(ids) == text == tok.decode(ids)


def test_own_safetensors_format_keeps_our_names(tmp_path):
    cfg, params, buffers = random_run(tmp_path / "run", tie_embeddings=False)
    out = export.export(tmp_path / "run", tmp_path / "st", fmt="safetensors")
    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == {"embed", "final_norm.scale", "lm_head"} | {
        f"blocks.{i}.{p}"
        for i in range(3)
        for p in (
            "attn_norm.scale",
            "attn.wq",
            "attn.wk",
            "attn.wv",
            "attn.wo",
            "mlp_norm.scale",
            "mlp.w_gate",
            "mlp.w_up",
            "mlp.w_down",
        )
    }
    np.testing.assert_array_equal(tensors["blocks.2.attn.wq"], params["blocks"]["attn"]["wq"][2])
    np.testing.assert_array_equal(tensors["embed"], params["embed"])
    assert configs.load(out / "config.yaml") == cfg


def random_llama(directory, **overrides):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        **{
            "vocab_size": 67,
            "hidden_size": 48,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 6,
            "num_key_value_heads": 3,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 64,
            "initializer_range": 0.2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 700.0},
            "bos_token_id": None,
            "eos_token_id": None,
            **overrides,
        }
    )
    model = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_import_llama_gives_same_logits_and_round_trips_bitwise(tmp_path, tie):
    random_llama(tmp_path / "llama", tie_word_embeddings=tie)
    run = export.import_hf(tmp_path / "llama", tmp_path / "run")
    loaded = weights.load(run)
    cfg, params, buffers = loaded.cfg, loaded.params, loaded.buffers
    assert loaded.step == 0 and loaded.tok is None and cfg.model.tie_embeddings is tie and cfg.model.num_kv_heads == 3
    ids = tokens(cfg)
    assert_logits_match(
        hf_logits(tmp_path / "llama", ids),
        podtrain_logits(cfg, params, buffers, ids),
        f"import llama {'tied' if tie else 'untied'}",
    )

    out = export.export(run, tmp_path / "again")
    assert_same_tensors(tmp_path / "llama" / "model.safetensors", out / "model.safetensors")
    assert (tmp_path / "llama" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_import_export_round_trip_keeps_the_tokenizer(tmp_path):
    random_run(tmp_path / "run", vocab_size=66)
    export.export(tmp_path / "run", tmp_path / "hf")
    export.import_hf(tmp_path / "hf", tmp_path / "run2")
    imported, char = tokenizer.load_run(tmp_path / "run2"), tokenizer.CharTokenizer(CHARS)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert imported.kind == "hf" and imported.encode(text).tolist() == char.encode(text).tolist()
    assert (imported.vocab_size, imported.eos_id) == (char.vocab_size, char.eos_id)
    export.export(tmp_path / "run2", tmp_path / "hf2")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name


def llama3_style_tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer.json trained here, with Llama 3's specials: its post-processor
    prepends <|begin_of_text|>, <|end_of_text|> ends text. Saved by transformers into `directory`."""
    from tokenizers import Tokenizer, processors

    from podtrain.data import tokenizer_train

    tok = Tokenizer.from_str(tokenizer_train.train([heldout_text()] * 2, 300).files()["tokenizer.json"].decode())
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    hf_tok.save_pretrained(directory)
    return hf_tok


def heldout_text() -> str:
    return "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 3


def test_import_keeps_a_bpe_tokenizer_and_samples_like_transformers(tmp_path):
    """A Llama with a BPE tokenizer.json imports with its tokenizer (not dropped, not 'char'):
    sample works on the run, greedy text equals transformers', and the export's tokenizer gives
    transformers' ids of the original."""
    from podtrain.inference import generate

    hf_tok = llama3_style_tokenizer(tmp_path / "llama")
    specials = {"bos_token_id": hf_tok.bos_token_id, "eos_token_id": hf_tok.eos_token_id}
    random_llama(tmp_path / "llama", vocab_size=len(hf_tok), **specials)
    run = export.import_hf(tmp_path / "llama", tmp_path / "run")
    tok = tokenizer.load_run(run)
    assert (tok.kind, tok.vocab_size, tok.add_bos) == ("hf", len(hf_tok), True)
    assert (tok.bos_id, tok.eos_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id)
    prompt = "Before we speak"
    assert tok.prompt(prompt).tolist() == hf_tok(prompt)["input_ids"]

    ours = generate.sample_run(run, prompt, 8, temperature=0)
    print(f"import BPE: sample {ours!r}")
    assert len(ours) > len(prompt)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    ids = torch.as_tensor([hf_tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert ours == prompt + hf_tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)

    exported = export.export(run, tmp_path / "hf")
    again = transformers.AutoTokenizer.from_pretrained(exported)
    text = heldout_text()
    assert again(text)["input_ids"] == hf_tok(text)["input_ids"] == tok.prompt(text).tolist()
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == hf_tok.eos_token_id and generation["bos_token_id"] == hf_tok.bos_token_id


def test_sentencepiece_run_exports_a_tokenizer_transformers_reads_with_our_ids(tmp_path):
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(heldout_text().splitlines() * 20),
        model_writer=model,
        vocab_size=320,  # the 256 byte pieces and the text's characters, then a few merges
        hard_vocab_limit=False,
        byte_fallback=True,
        minloglevel=2,
        num_threads=1,
    )
    tok = tokenizer.SentencePieceTokenizer(model.getvalue())
    random_run(tmp_path / "run", tok=tok, vocab_size=tok.vocab_size, num_layers=1)
    out = export.export(tmp_path / "run", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = heldout_text() + "Ünïcödé never seen"
    assert theirs(text)["input_ids"] == tok.prompt(text).tolist() and tok.add_bos
    assert theirs.eos_token_id == tok.eos_id
    assert theirs.decode(tok.encode(text).tolist()) == tok.decode(tok.encode(text))


def test_import_rejects_features_podtrain_lacks(tmp_path):
    random_llama(tmp_path / "biased", attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias"):
        export.import_hf(tmp_path / "biased", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_never_loads_pickle(tmp_path):
    model = random_llama(tmp_path / "llama")
    (tmp_path / "llama" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "llama" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickle files are never loaded"):
        export.import_hf(tmp_path / "llama", tmp_path / "run")


def test_export_refuses_what_llama_cannot_express(tmp_path):
    random_run(tmp_path / "run", d_model=40, num_heads=6, num_kv_heads=3, head_dim=8)
    with pytest.raises(ConfigError, match="num_heads to divide d_model"):
        export.export(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_errors_are_one_line_and_overwrite_nothing(tmp_path, capsys):
    random_run(tmp_path / "run", num_layers=1)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    assert cli.main(["export", f"{tmp_path / 'run'}:7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint" in err.lower() and "7" in err
    assert cli.main(["export", f"{tmp_path / 'run'}:0", "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert cli.main(["export", f"{tmp_path / 'run'}:0", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "model.safetensors").exists()


def hf_greedy(directory, prompt: str, max_new_tokens: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.as_tensor([tok.encode(prompt, add_special_tokens=False)])
    # an explicit mask: without one, generate masks every prompt token equal to pad_token_id
    # (id 0 is '\n' in the char tokenizer), and it needs some pad_token_id (our models have none)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return tok.decode(out[0].tolist())


def heldout_dir(tmp_path, shakespeare_dir):
    return heldout_folder(tmp_path / "heldout", shakespeare_dir)


@pytest.mark.slow
def test_pretrain_finetune_export_gives_the_same_greedy_text(tiny_config, tmp_path, shakespeare_dir):
    """Pretrain on tiny shakespeare, fine-tune (full, and LoRA), export, and run in transformers:
    greedy text equal to `podtrain sample --temperature 0` (within the trained context, where both
    see every token), and LoRA runs export their merged weights."""
    from podtrain.inference import generate
    from podtrain.train import finetune, loop

    model = ("data.seq_len=48", "train.lr=1e-2", "train.min_lr=1e-3")
    base = tiny_config(*model, "train.steps=150", "train.eval_every=150")
    loop.pretrain(base)
    held = heldout_dir(tmp_path, shakespeare_dir)
    tune = (
        *heldout_data(held),
        f"finetune.init_from={base.run.dir}",
        "train.steps=10",
        "train.eval_every=10",
        "train.lr=1e-3",
    )
    ft = tiny_config(*model, *tune, f"run.dir={tmp_path / 'ft'}")
    finetune.finetune(ft)
    out = export.export(ft.run.dir, tmp_path / "hf")
    prompt, n = "ROMEO:\nWhat ", 36  # prompt + new tokens <= seq_len: no window refill in podtrain
    ours = generate.sample_run(ft.run.dir, prompt, n, temperature=0)
    assert len(set(ours[len(prompt) :])) > 1  # not a degenerate single-character run
    assert hf_greedy(out, prompt, n) == ours

    lora = tiny_config(*model, *tune, "finetune.mode=lora", "finetune.lora_rank=2", f"run.dir={tmp_path / 'lora'}")
    finetune.finetune(lora)
    out = export.export(lora.run.dir, tmp_path / "hf_lora")
    merged, _ = finetune.merged_params(lora.run.dir)
    base_run = weights.load(base.run.dir)
    base_cfg, base_params = base_run.cfg, base_run.params
    assert not np.array_equal(merged["blocks"]["attn"]["wq"], base_params["blocks"]["attn"]["wq"])
    ids = tokens(base_cfg)
    assert_logits_match(hf_logits(out, ids), podtrain_logits(base_cfg, merged, {}, ids), "export LoRA-merged")


@pytest.mark.slow
def test_imported_model_can_be_fine_tuned_sampled_and_exported(tmp_path, tfds_dir, shakespeare_dir):
    from podtrain.inference import generate
    from podtrain.train import finetune

    cfg, _, _ = random_run(tmp_path / "run", vocab_size=66, num_layers=2, tie_embeddings=False)
    export.export(tmp_path / "run", tmp_path / "hf")
    run = export.import_hf(tmp_path / "hf", tmp_path / "imported", ["data.seq_len=32"])
    assert generate.sample_run(run, "ROMEO:", 8, temperature=0).startswith("ROMEO:")
    held = heldout_dir(tmp_path, shakespeare_dir)
    model = [f"model.{k}={v}" for k, v in configs.to_dict(cfg)["model"].items()]
    ft = configs.load(
        None,
        model
        + [
            "data.seq_len=32",
            "data.eval_batches=2",
            *heldout_data(held),
            f"data.data_dir={tfds_dir}",
            "train.steps=3",
            "train.eval_every=3",
            "train.batch_size=4",
            "train.log_every=1",
            "train.peak_flops=1e11",
            "mesh.devices=1",
            "run.progress=false",
            f"finetune.init_from={run}",
            f"run.dir={tmp_path / 'ft'}",
        ],
    )
    result = finetune.finetune(ft)
    assert np.isfinite(result["val_loss"])
    out = export.export(ft.run.dir, tmp_path / "hf2")
    ids = tokens(cfg)
    assert_logits_match(
        hf_logits(out, ids), podtrain_logits(cfg, result["params"], {}, ids), "import -> fine-tune -> export"
    )


def test_export_fetches_one_layer_at_a_time(tmp_path, monkeypatch):
    cfg, params, buffers = random_run(tmp_path / "run", num_layers=4, tie_embeddings=False)
    fetched = []
    host = export._host
    monkeypatch.setattr(export, "_host", lambda x: fetched.append(x.shape) or host(x))
    export.export(tmp_path / "run", tmp_path / "hf")
    # every global once, every layer parameter once per layer; never a whole stack of layers
    assert not jax.tree.leaves(buffers)
    layer_shapes = [x.shape[1:] for x in jax.tree.leaves(params["blocks"])] * 4
    global_shapes = [x.shape for k, v in params.items() if k != "blocks" for x in jax.tree.leaves(v)]
    assert collections.Counter(fetched) == collections.Counter(layer_shapes + global_shapes)


MIXTRAL_MOE = {"num_experts": 5, "top_k": 2, "expert_mlp_dim": 19, "router": "softmax_topk", "normalize_topk": True}
DEEPSEEK_MOE = {  # DeepSeek-V3 routing: sigmoid, bias-corrected group-limited choice, scaling, shared experts
    "num_experts": 6,
    "top_k": 2,
    "expert_mlp_dim": 19,
    "router": "sigmoid_bias",
    "normalize_topk": True,
    "n_groups": 3,
    "topk_groups": 2,
    "routed_scaling": 2.5,
    "num_shared_experts": 1,
    "first_dense_layers": 1,
}
MOE_CASES = {
    "mixtral": (MIXTRAL_MOE, "MixtralForCausalLM"),
    "deepseek_routing": (DEEPSEEK_MOE, "Glm4MoeForCausalLM"),
    "sigmoid_plain": (
        {
            **DEEPSEEK_MOE,
            "n_groups": 1,
            "topk_groups": 1,
            "num_shared_experts": 0,
            "first_dense_layers": 0,
            "normalize_topk": False,
            "routed_scaling": 1.0,
        },
        "Glm4MoeForCausalLM",
    ),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_export_matches_transformers_logits(tmp_path, case):
    moe, arch = MOE_CASES[case]
    cfg, params, buffers = random_run(tmp_path / "run", moe=moe, tie_embeddings=False)
    out = export.export(tmp_path / "run", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    ids = tokens(cfg)
    ours, theirs = podtrain_logits(cfg, params, buffers, ids), hf_logits(out, ids)
    assert np.abs(ours).max() > 1.0
    assert_logits_match(theirs, ours, f"export MoE {case}")


@pytest.mark.parametrize(
    "moe, feature",
    [
        ({**MIXTRAL_MOE, "normalize_topk": False}, "normalize_topk"),
        ({**MIXTRAL_MOE, "num_shared_experts": 1}, "shared experts"),
        ({**MIXTRAL_MOE, "every": 3}, "dense layers"),
        ({**DEEPSEEK_MOE, "first_dense_layers": 0, "every": 3}, "model.moe.every=3"),
        ({**DEEPSEEK_MOE, "shared_mlp_dim": 7}, "shared_mlp_dim"),
    ],
    ids=["unnormalized", "shared", "interleaved", "glm_every", "shared_width"],
)
def test_moe_export_refuses_what_no_class_expresses(tmp_path, moe, feature):
    random_run(tmp_path / "run", moe=moe)
    with pytest.raises(ConfigError, match=feature):
        export.export(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_group_limited_export_refuses_negative_router_bias(tmp_path):
    cfg, params, buffers = random_run(tmp_path / "run", moe=DEEPSEEK_MOE)
    buffers = jax.tree.map(lambda b: b - 1.0, buffers)
    export.write_run(cfg, tokenizer.CharTokenizer(CHARS), params, buffers, tmp_path / "run2")
    with pytest.raises(ConfigError, match="negative router bias"):
        export.export(tmp_path / "run2", tmp_path / "hf")


def random_hf_moe(directory, arch):
    torch.manual_seed(0)
    common = dict(
        vocab_size=67,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        hf_cfg = transformers.MixtralConfig(
            intermediate_size=19,
            num_local_experts=5,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 700.0},
            **common,
        )
        model = transformers.MixtralForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Glm4MoeConfig(
            intermediate_size=37,
            moe_intermediate_size=19,
            n_routed_experts=6,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=3,
            topk_group=2,
            routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "default", "rope_theta": 700.0, "partial_rotary_factor": 1.0},
            **common,
        )
        model = transformers.Glm4MoeForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.5)
    model.save_pretrained(directory)


@pytest.mark.parametrize("arch", ["mixtral", "glm4_moe"])
def test_import_moe_gives_same_logits_and_round_trips_bitwise(tmp_path, arch):
    random_hf_moe(tmp_path / "hf", arch)
    run = export.import_hf(tmp_path / "hf", tmp_path / "run")
    loaded = weights.load(run)
    cfg, params, buffers = loaded.cfg, loaded.params, loaded.buffers
    assert cfg.model.moe.num_experts in (5, 6)
    ids = tokens(cfg)
    assert_logits_match(hf_logits(tmp_path / "hf", ids), podtrain_logits(cfg, params, buffers, ids), f"import {arch}")
    out = export.export(run, tmp_path / "again")
    assert_same_tensors(tmp_path / "hf" / "model.safetensors", out / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Fine-tuning runs: `sample` and `export` read freeze and LoRA runs (whose checkpoints hold
# {'train', 'frozen'}) as the model `finetune.merged_params` rebuilds, dense and MoE.
# ---------------------------------------------------------------------------------------------

FT_KINDS = {
    "dense": (),
    # DeepSeek-style sigmoid router whose biases move every step (model.moe.bias_update_rate): the
    # fine-tuned run's buffers differ from the base run's, so reading the wrong ones shows
    "moe": (
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        "model.moe.expert_mlp_dim=32",
        "model.moe.router=sigmoid_bias",
        "model.moe.bias_update_rate=0.05",
    ),
}
FT_MODES = {
    "freeze": ("finetune.mode=freeze", "finetune.freeze=^embed$|attn/"),
    "lora": ("finetune.mode=lora", "finetune.lora_rank=2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_sample_and_export_read_freeze_and_lora_runs(tiny_config, tmp_path, capsys, kind):
    from podtrain.inference import generate
    from podtrain.train import finetune, integrity, loop

    # a large init_std: the barely trained model's greedy text is varied, not one repeated character
    model = (*FT_KINDS[kind], "model.init_std=0.3", "train.lr=1e-2")
    base = tiny_config(*model)
    loop.pretrain(base)
    base_run = weights.load(base.run.dir)
    ids = tokens(base_run.cfg, shape=(2, 16))
    base_logits = podtrain_logits(base_run.cfg, base_run.params, base_run.buffers, ids)
    prompt, n = "ROMEO:", 24
    base_text = generate.sample_run(base.run.dir, prompt, n, temperature=0)
    assert len(set(base_text[len(prompt) :])) > 3
    for mode, overrides in FT_MODES.items():
        ft = tiny_config(
            *model,
            *overrides,
            f"finetune.init_from={base.run.dir}",
            "train.steps=3",
            "train.lr=2e-2",  # larger steps leave logits whose fp32 rounding alone nears TOL
            f"run.dir={tmp_path / mode}",
        )
        finetune.finetune(ft)
        merged, step = finetune.merged_params(ft.run.dir)
        run = weights.load(ft.run.dir)
        assert run.step == step == 3 and run.cfg.finetune.mode == mode
        assert integrity.tree_digest(run.params) == integrity.tree_digest(merged)
        if kind == "moe":
            assert integrity.tree_digest(run.buffers) != integrity.tree_digest(base_run.buffers)
        ours = podtrain_logits(run.cfg, merged, run.buffers, ids)
        assert np.abs(ours - base_logits).max() > 1e-3, "the fine-tune did not change the model: nothing is tested"

        # sample (the CLI verb) == generation from the merged parameters, != the base's text
        capsys.readouterr()
        assert (
            cli.main(
                [
                    "sample",
                    "--run",
                    str(ft.run.dir),
                    "--prompt",
                    prompt,
                    "--max-new-tokens",
                    str(n),
                    "--temperature",
                    "0",
                ]
            )
            == 0
        )
        graphdef = weights.abstract_trees(run.cfg)[0]
        variables = weights.merge_trees(jax.device_put(merged), run.buffers)
        want = generate.generate(
            graphdef, variables, run.cfg.model, run.tok.encode(prompt), n, run.cfg.data.seq_len, temperature=0
        )
        assert capsys.readouterr().out == prompt + run.tok.decode(want) + "\n"
        assert prompt + run.tok.decode(want) != base_text

        # export: transformers' logits are the merged model's; our own format holds the merged tensors
        out = export.export(ft.run.dir, tmp_path / f"hf_{mode}")
        assert_logits_match(hf_logits(out, ids), ours, f"export {kind} {mode} run")
        tensors = load_file(export.export(ft.run.dir, tmp_path / f"st_{mode}", fmt="safetensors") / "model.safetensors")
        stack = "moe_units" if kind == "moe" else "blocks"
        for name, x in export._flatten(jax.tree.map(lambda a: np.asarray(a)[1], merged[stack])).items():
            np.testing.assert_array_equal(tensors[f"{stack}.1.{name}"], x)


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_moe_pretrain_finetune_export_greedy_text_matches_transformers(tmp_path, tfds_dir, shakespeare_dir, capsys):
    """The CLI verbs on configs/shakespeare_moe.yaml (its model.moe section: 8 experts, softmax top-2,
    renormalized; half its width and layers, for time): pretrain, fine-tune on held-out text,
    export --format hf; transformers' greedy generate == `podtrain sample --temperature 0` for as
    many new tokens as the trained context holds (beyond it, sample re-encodes a shorter window)."""
    where = [
        f"data.data_dir={tfds_dir}",
        "data.eval_batches=2",
        "mesh.devices=1",
        "run.progress=false",
        "train.peak_flops=1e11",
    ]
    base_dir, ft_dir, out = tmp_path / "moe", tmp_path / "moe_ft", tmp_path / "hf"
    assert (
        cli.main(
            [
                "pretrain",
                "--config",
                str(ROOT / "configs" / "shakespeare_moe.yaml"),
                *where,
                "model.num_layers=2",
                "model.d_model=64",
                "model.mlp_dim=176",
                "model.moe.expert_mlp_dim=88",
                f"data.manual_dir={shakespeare_dir}",
                "train.steps=300",
                "train.eval_every=300",
                "train.warmup_steps=20",
                "train.lr=3e-3",
                "train.min_lr=3e-4",
                f"run.dir={base_dir}",
            ]
        )
        == 0
    )
    base = configs.to_dict(configs.load(base_dir / "config.yaml"))
    assert base["model"]["moe"]["num_experts"] == 8 and base["model"]["moe"]["router"] == "softmax_topk"
    same_model = [f"{k}={v}" for k, v in configs.flat({"model": base["model"]}).items()]
    assert (
        cli.main(
            [
                "finetune",
                "--config",
                str(ROOT / "configs" / "shakespeare_char_ft.yaml"),
                *where,
                *same_model,
                *heldout_data(heldout_dir(tmp_path, shakespeare_dir)),
                f"finetune.init_from={base_dir}",
                "train.steps=20",
                "train.eval_every=20",
                "train.warmup_steps=2",
                "train.lr=1e-3",
                f"run.dir={ft_dir}",
            ]
        )
        == 0
    )
    assert cli.main(["export", str(ft_dir), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]

    prompt = "JULIET:\n"
    n = base["data"]["seq_len"] - len(prompt)  # 56: prompt + new tokens fill the trained context
    capsys.readouterr()
    assert (
        cli.main(["sample", "--run", str(ft_dir), "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0"])
        == 0
    )
    ours = capsys.readouterr().out.removesuffix("\n")
    print(f"greedy continuation of {prompt!r}: {ours[len(prompt) :]!r}")
    assert ours.startswith(prompt) and len(ours) == len(prompt) + n
    assert len(set(ours[len(prompt) :])) > 3  # a real continuation, not one repeated character
    assert hf_greedy(out, prompt, n) == ours
