"""Fine-tuning from a pretrained run: full, freeze, LoRA; checks; JSONL packing without leaks."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from podtrain.data import pipeline
from podtrain.data.tokenizer import CharTokenizer
from podtrain.launch import cli
from podtrain.model import Transformer
from podtrain.train import adapters, finetune, integrity, loop
from podtrain.train import config as configs
from podtrain.train.config import ConfigError

import conftest
from conftest import heldout_data, heldout_folder

TINY = [*conftest.TINY, "mesh.devices=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tfds_dir, shakespeare_dir):
    """A short shakespeare pretrain, and a held-out folder made of its (never trained on) test split."""
    tmp = tmp_path_factory.mktemp("base")
    data = [f"data.data_dir={tfds_dir}", f"data.manual_dir={shakespeare_dir}"]
    cfg = configs.load(None, TINY + data + ["train.steps=30", "train.eval_every=30", f"run.dir={tmp / 'run'}"])
    result = loop.pretrain(cfg)
    return tmp / "run", result["state"].params, heldout_folder(tmp / "heldout", shakespeare_dir)


def _ft_config(base_run, tmp_path, tfds_dir, *overrides):
    run, _, held = base_run
    return configs.load(
        None,
        TINY
        + [
            f"data.data_dir={tfds_dir}",
            *heldout_data(held),
            "train.steps=6",
            "train.eval_every=6",
            f"run.dir={tmp_path / 'ft'}",
            f"finetune.init_from={run}",
            *overrides,
        ],
    )


def test_full_finetune_beats_training_from_scratch(base_run, tmp_path, tfds_dir):
    cfg = _ft_config(base_run, tmp_path, tfds_dir)
    tuned = finetune.finetune(cfg)
    scratch = loop.pretrain(configs.replace(cfg, run={"dir": str(tmp_path / "scratch")}))
    print(
        f"held-out val_loss after 6 steps: fine-tuned {tuned['val_loss']:.4f}, from scratch {scratch['val_loss']:.4f}"
    )
    assert tuned["val_loss"] < scratch["val_loss"] - 0.05


def test_freeze_keeps_frozen_parameters_bitwise(base_run, tmp_path, tfds_dir):
    _, base_params, _ = base_run
    cfg = _ft_config(base_run, tmp_path, tfds_dir, "finetune.mode=freeze", "finetune.freeze=^embed$|attn/")
    result = finetune.finetune(cfg)
    base, tuned = adapters.flatten(base_params), adapters.flatten(result["params"])
    assert base.keys() == tuned.keys()
    frozen = [p for p in base if p == "embed" or "attn/" in p]
    assert len(frozen) == 5
    for p in base:
        same = np.array_equal(np.asarray(base[p]), np.asarray(tuned[p]))
        assert same == (p in frozen), p
    opt_leaves = jax.tree_util.tree_flatten_with_path(result["state"].opt_state)[0]
    keys = [jax.tree_util.keystr(path) for path, _ in opt_leaves]
    assert any("['blocks/mlp/w_up']" in k for k in keys)
    assert not any("attn/" in k or "['embed']" in k for k in keys), "frozen parameters have no optimizer state"


def test_lora_trains_factors_and_merges_into_the_base_tree(base_run, tmp_path, tfds_dir):
    _, base_params, _ = base_run
    cfg = _ft_config(
        base_run, tmp_path, tfds_dir, "finetune.mode=lora", "finetune.lora_rank=2", "finetune.lora_targets=attn/w[qv]$"
    )
    result = finetune.finetune(cfg)
    train = result["state"].params["train"]
    assert sorted(train) == ["blocks/attn/wq", "blocks/attn/wv"]
    assert train["blocks/attn/wq"]["a"].shape == (2, 32, 2) and train["blocks/attn/wq"]["b"].shape == (2, 2, 32)
    base, merged = adapters.flatten(base_params), adapters.flatten(result["params"])
    for p in base:
        same = np.array_equal(np.asarray(base[p]), np.asarray(merged[p]))
        assert same == (p not in train), p
    # the merged weight is W + alpha/r * a @ b, and frozen base weights are bitwise the base's
    ab = train["blocks/attn/wq"]
    want = base["blocks/attn/wq"] + (16.0 / 2) * jnp.matmul(ab["a"], ab["b"]).reshape(2, 32, 4, 8)
    np.testing.assert_allclose(merged["blocks/attn/wq"], want, rtol=1e-6, atol=1e-7)
    for p, v in adapters.flatten(result["state"].params["frozen"]).items():
        np.testing.assert_array_equal(v, base[p])
    # the export function reads the same merged parameters back from the run dir
    exported, step = finetune.merged_params(cfg.run.dir)
    assert step == 6 and integrity.tree_digest(exported) == integrity.tree_digest(result["params"])
    # and the plain model with merged weights gives the loss the LoRA run reported
    _check_plain_model_loss(cfg, result)


def test_merged_params_of_a_run_trained_on_slices(base_run, tmp_path, tfds_dir):
    """A LoRA run trained on 2 (emulated) slices reads back on one device for sample and export."""
    cfg = _ft_config(
        base_run,
        tmp_path,
        tfds_dir,
        "finetune.mode=lora",
        "finetune.lora_rank=2",
        "mesh.devices=4",
        "mesh.dcn_data=2",
        "train.steps=2",
        "train.eval_every=2",
    )
    result = finetune.finetune(cfg)
    exported, step = finetune.merged_params(cfg.run.dir)
    assert step == 2 and integrity.tree_digest(exported) == integrity.tree_digest(result["params"])


def _check_plain_model_loss(cfg, result):
    from podtrain.data import tokenizer
    from podtrain.parallel import mesh as meshes
    from podtrain.parallel import rules
    from podtrain.train import optim
    from podtrain.train import state as states
    from podtrain.train import step as steps

    cfg = loop.resolve(cfg, 66)
    lay = states.layout(cfg.model, optim.optimizer(cfg.train), meshes.build_mesh(cfg.mesh))
    train_batches, val, _ = finetune.load_data(cfg, tokenizer.load_run(cfg.run.dir), 0, 1)
    train_batches.close()
    batches = [loop.global_batch(b, rules.batch_sharding(lay.mesh), cfg.train.batch_size) for b in val]
    params = jax.device_put(result["params"], lay.params)
    loss, _ = loop.evaluate(steps.make_eval_step(lay), params, batches)
    np.testing.assert_allclose(loss, result["val_loss"], rtol=1e-5)


def test_lora_starts_exactly_at_the_base_model(base_run):
    _, base_params, _ = base_run
    cfg = configs.load(None, TINY + ["finetune.mode=lora", "model.vocab_size=128"])
    adapter = adapters.build(cfg.finetune, cfg.model)
    split = adapter.split(base_params, jax.random.key(0))
    assert integrity.tree_digest(adapter.merged(split)) == integrity.tree_digest(base_params)
    assert sorted(split["train"]) == [
        f"blocks/{m}" for m in ("attn/wk", "attn/wo", "attn/wq", "attn/wv", "mlp/w_down", "mlp/w_gate", "mlp/w_up")
    ]


def test_architecture_mismatch_lists_the_parameters_and_exits_2(base_run, tmp_path, tfds_dir, capsys):
    cfg = _ft_config(base_run, tmp_path, tfds_dir, "model.mlp_dim=48")
    with pytest.raises(ConfigError, match=r"blocks/mlp/w_down: base \(2, 64, 32\) vs \(2, 48, 32\)"):
        finetune.finetune(cfg)
    assert not (tmp_path / "ft").exists(), "nothing may be written for bad input"
    config = tmp_path / "ft.yaml"
    config.write_text(configs.dump(cfg))
    assert cli.main(["finetune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "w_gate" in err and "w_up" in err and len(err.strip().splitlines()) == 1


def test_tokenizer_mismatch_lists_the_characters(base_run, tmp_path, tfds_dir):
    held = tmp_path / "odd"
    held.mkdir()
    (held / "train.txt").write_text("To be, or not to be: 1 + 2 = 3 €\n" * 50)
    (held / "validation.txt").write_text("that is the question\n" * 50)
    cfg = _ft_config(base_run, tmp_path, tfds_dir, *heldout_data(held))
    with pytest.raises(ConfigError, match=r"data train document 0: .*'\+12=€'"):
        finetune.finetune(cfg)
    with pytest.raises(ConfigError, match="data.tokenizer='byte' does not match the base run's 'char'"):
        finetune.finetune(_ft_config(base_run, tmp_path, tfds_dir, "data.tokenizer=byte"))


def test_the_base_runs_tokenizer_is_used_and_checked(base_run, tmp_path, tfds_dir):
    from podtrain.data import tokenizer

    run, _, _ = base_run
    base_tok = tokenizer.load_run(run)
    for spec in ("char", "data.tokenizer=char", f"data.tokenizer={run / 'tokenizer'}"):
        overrides = [] if spec == "char" else [spec]
        assert finetune.base_checkpoint(_ft_config(base_run, tmp_path, tfds_dir, *overrides))[2] == base_tok
    CharTokenizer("abc").save(tmp_path / "other")
    with pytest.raises(ConfigError, match="does not match the base run's 'char' tokenizer: omit data.tokenizer"):
        finetune.base_checkpoint(_ft_config(base_run, tmp_path, tfds_dir, f"data.tokenizer={tmp_path / 'other'}"))
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    CharTokenizer(base_tok.chars[::-1]).save(copy / "tokenizer")  # same characters, other ids
    with pytest.raises(ConfigError, match="tokenizer/ files other than the tokenizer step 30 was trained with"):
        finetune.base_checkpoint(_ft_config(base_run, tmp_path, tfds_dir, f"finetune.init_from={copy}"))


def test_init_from_a_step_and_bad_values(base_run, tmp_path, tfds_dir):
    run, _, _ = base_run
    with pytest.raises(ConfigError, match="no valid checkpoint at step 7"):
        finetune.finetune(_ft_config(base_run, tmp_path, tfds_dir, f"finetune.init_from={run}:7"))
    with pytest.raises(ConfigError, match="not a podtrain run"):
        finetune.finetune(_ft_config(base_run, tmp_path, tfds_dir, f"finetune.init_from={tmp_path}"))
    result = finetune.finetune(
        _ft_config(base_run, tmp_path, tfds_dir, f"finetune.init_from={run}:30", "train.steps=2", "train.eval_every=2")
    )
    assert result["base"].endswith(":30")


# -- JSONL: loss mask and packing ------------------------------------------------------------------


def test_packing_masks_prompts_and_separates_examples():
    tok = CharTokenizer("abcdefgh|")
    records = [
        {"prompt": "ab|", "completion": "cd"},
        {"prompt": "e|", "completion": "fgh"},
        {"prompt": "h|", "completion": "a"},
    ]
    docs = pipeline.documents(tok, records, "text", "memory")
    packer = pipeline._Packer(9, lambda k: docs if k == 0 else None)
    rows = [packer.row()[0] for _ in range(2)]
    # example pairs 4 + 1 (EOS), 4 + 1, 2 + 1: the first fills row 0 but for 4, so the second starts row 1
    seg = np.stack([r["segment_ids"] for r in rows])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2, 0]])
    eos = tok.decode([tok.eos_id])
    assert tok.decode(rows[0]["inputs"][:5]) == "ab|cd" and tok.decode(rows[0]["targets"][:4]) + eos == "b|cd"
    assert rows[0]["targets"][4] == tok.eos_id
    # weight 1 exactly where the target is a completion character or the EOS
    np.testing.assert_array_equal(rows[0]["weights"], [0, 0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[1]["weights"], [0, 1, 1, 1, 1, 0, 1, 1, 0])


def test_packed_logits_equal_each_example_alone():
    """No attention across examples: a packed row gives each example the logits it has alone."""
    from flax import nnx

    from podtrain.model import ModelConfig

    cfg = ModelConfig(vocab_size=11, num_layers=2, d_model=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    lengths = [5, 3, 4]
    examples = [rng.integers(0, 11, n + 1).astype(np.int32) for n in lengths]
    docs = {
        "tokens": np.concatenate(examples),
        "starts": np.cumsum([0] + [n + 1 for n in lengths]),
        "loss_mask": np.ones(sum(lengths) + 3, bool),
        "whole": np.ones(3, bool),
        "bytes": np.ones(3),
    }
    row = pipeline._Packer(12, lambda k: docs if k == 0 else None).row()[0]
    rows = {k: v[None] for k, v in row.items()}
    packed = model(
        jnp.asarray(rows["inputs"]),
        positions_BT=jnp.asarray(rows["positions"]),
        segment_ids_BT=jnp.asarray(rows["segment_ids"]),
    )[0][0]
    start = 0
    for ex, n in zip(examples, lengths):
        alone = model(jnp.asarray(ex[None, :-1]))[0][0]
        np.testing.assert_allclose(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n
    leaky = model(jnp.asarray(rows["inputs"]))[0][0]  # without segments the later examples see earlier ones
    assert not np.allclose(leaky[5:8], packed[5:8], atol=1e-4)


def test_jsonl_finetune_learns_completions(base_run, tmp_path, tfds_dir):
    folder = tmp_path / "qa"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["king", "queen", "lord", "lady", "duke", "good", "fair", "sweet"]

    def lines(n):
        out = []
        for _ in range(n):
            w = rng.choice(words)
            out.append(json.dumps({"prompt": f"Q: {w}?\nA:", "completion": f" {w[::-1]}.\n"}))
        return "\n".join(out) + "\n"

    (folder / "train.jsonl").write_text(lines(200))
    (folder / "validation.jsonl").write_text(lines(40))
    cfg = _ft_config(
        base_run,
        tmp_path,
        tfds_dir,
        f"data.dataset={folder}/train.jsonl",
        f"data.validation={folder}/validation.jsonl",
        "data.seq_len=32",
        "train.steps=30",
        "train.eval_every=5",
        "train.lr=3e-3",
    )
    finetune.finetune(cfg)
    rows = [json.loads(line) for line in Path(cfg.run.dir, "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in rows if "val_loss" in r and r["step"] > 0]  # step 0: the base model
    print("jsonl completion val_loss", [round(v, 3) for v in evals])
    assert evals[-1] < evals[0] - 0.3


def test_finetune_resumes_like_pretraining(base_run, tmp_path, tfds_dir):
    cfg = _ft_config(base_run, tmp_path, tfds_dir, "finetune.mode=lora", "checkpoint.every=3")
    straight = finetune.finetune(configs.replace(cfg, run={"dir": str(tmp_path / "straight")}))
    shutil.copytree(tmp_path / "straight", tmp_path / "ft")
    shutil.rmtree(tmp_path / "ft" / "checkpoints" / "6")  # as if stopped after saving step 3
    resumed = finetune.finetune(cfg)
    assert integrity.tree_digest(resumed["state"].params) == integrity.tree_digest(straight["state"].params)


def test_shipped_finetune_config_loads():
    from pathlib import Path

    cfg = configs.load(Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char_ft.yaml")
    assert cfg.finetune.init_from and cfg.data.dataset.endswith("heldout/train.txt")
    assert cfg.model == configs.load(Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.yaml").model
