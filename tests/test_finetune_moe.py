"""Fine-tuning MoE models through the step loop pretraining uses: router biases, MoE losses and
statistics, freeze and LoRA (one pair of factors per expert)."""

import jax
import numpy as np
import pytest

from podtrain.data import tokenizer
from podtrain.parallel import mesh as meshes
from podtrain.parallel import rules
from podtrain.train import adapters, finetune, integrity, loop, optim
from podtrain.train import config as configs
from podtrain.train import metrics as metrics_io
from podtrain.train import state as states
from podtrain.train import step as steps
from podtrain.train.config import ConfigError

import conftest
from conftest import heldout_data, heldout_folder

TINY = [*conftest.TINY, "mesh.devices=1"]
# DeepSeek-V3-style routing: the router bias (a buffer, not a parameter) picks the experts
MOE = [
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_mlp_dim=32",
    "model.moe.router=sigmoid_bias",
    "model.moe.bias_update_rate=0.05",
    "model.moe.load_balance_coef=0.01",
    "model.moe.z_loss_coef=0.001",
]
RATE = 0.05


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory, tfds_dir, shakespeare_dir):
    """A short MoE shakespeare pretrain (router biases moved away from 0), and a held-out folder."""
    tmp = tmp_path_factory.mktemp("moe_base")
    data = [f"data.data_dir={tfds_dir}", f"data.manual_dir={shakespeare_dir}"]
    cfg = configs.load(
        None, TINY + MOE + data + ["train.steps=9", "train.eval_every=9", "train.lr=1e-2", f"run.dir={tmp / 'run'}"]
    )
    state = loop.pretrain(cfg)["state"]
    held = heldout_folder(tmp / "heldout", shakespeare_dir)
    return tmp / "run", _host(state.params), _host(state.buffers), held


def _ft_config(moe_base, tmp_path, tfds_dir, *overrides):
    run, _, _, held = moe_base
    return configs.load(
        None,
        TINY
        + MOE
        + [
            f"data.data_dir={tfds_dir}",
            *heldout_data(held),
            "train.steps=4",
            "train.eval_every=4",
            f"run.dir={tmp_path / 'ft'}",
            f"finetune.init_from={run}",
            *overrides,
        ],
    )


def _evaluator(cfg):
    """(params, buffers) -> the plain (pretraining) model's held-out loss, compiled once."""
    cfg = loop.resolve(cfg, 66)
    lay = states.layout(cfg.model, optim.optimizer(cfg.train), meshes.build_mesh(cfg.mesh))
    train_batches, val, _ = finetune.load_data(cfg, tokenizer.load_run(cfg.run.dir), 0, 1)
    train_batches.close()
    batches = [loop.global_batch(b, rules.batch_sharding(lay.mesh), cfg.train.batch_size) for b in val]
    eval_step = steps.make_eval_step(lay)

    def loss(params, buffers) -> float:
        params, buffers = jax.device_put(params, lay.params), jax.device_put(buffers, lay.state.buffers)
        return loop.evaluate(eval_step, params, batches, buffers)[0]

    return loss


def _logged_bias(row: dict, layers=2, experts=4) -> np.ndarray:
    """The router biases a step started from, as metrics.jsonl logs them (L, E)."""
    return np.array([[row[f"moe/layer{i}/bias_e{j}"] for j in range(experts)] for i in range(layers)], np.float32)


def _bias(buffers) -> np.ndarray:
    return np.asarray(buffers["moe_units"]["moe_block"]["mlp"]["bias"])  # (L, E)


def test_full_finetune_carries_and_uses_the_base_router_biases(moe_base, tmp_path, tfds_dir):
    _, base_params, base_buffers, _ = moe_base
    assert np.abs(_bias(base_buffers)).max() >= RATE, "the base run's biases moved"
    cfg = _ft_config(moe_base, tmp_path, tfds_dir, "model.moe.bias_update_rate=0")  # biases stay the base's
    result = finetune.finetune(cfg)
    np.testing.assert_array_equal(_bias(_host(result["state"].buffers)), _bias(base_buffers))
    tuned = adapters.flatten(_host(result["params"]))
    assert all(not np.array_equal(v, tuned[p]) for p, v in adapters.flatten(base_params).items()), "all trained"

    rows = metrics_io.read(cfg.run.dir)
    val_loss = _evaluator(cfg)
    # step 0 evaluates the base model: with its router biases, which change the loss
    assert rows[0]["step"] == 0
    np.testing.assert_allclose(rows[0]["val_loss"], val_loss(base_params, base_buffers), rtol=1e-5)
    zero = jax.tree.map(np.zeros_like, base_buffers)
    assert abs(val_loss(base_params, zero) - rows[0]["val_loss"]) > 1e-3
    # the final eval is the tuned model with the carried biases
    np.testing.assert_allclose(result["val_loss"], val_loss(result["params"], base_buffers), rtol=1e-5)
    # the shared loop logs what pretraining logs, MoE statistics and balancing losses included
    logged = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for key in ("lr", "tokens_per_s", "mfu", "grad_norm", "moe/load_max", "moe/aux_loss", "moe/layer1/entropy"):
        assert key in logged[-1], key
    assert logged[-1]["moe/aux_loss"] > 0 and np.isfinite(logged[-1]["train_loss"])
    np.testing.assert_array_equal(_logged_bias(logged[-1]), _bias(base_buffers))
    assert (tmp_path / "ft" / "moe_load.png").exists()


@pytest.mark.slow  # ~30-45 s on 2 busy cores: compiles a MoE fine-tuning step and two evals
def test_freeze_keeps_frozen_parameters_bitwise_and_moves_router_biases(moe_base, tmp_path, tfds_dir):
    _, base_params, base_buffers, _ = moe_base
    cfg = _ft_config(moe_base, tmp_path, tfds_dir, "finetune.mode=freeze", "finetune.freeze=^embed$|attn/")
    result = finetune.finetune(cfg)
    base, tuned = adapters.flatten(base_params), adapters.flatten(_host(result["params"]))
    assert base.keys() == tuned.keys()
    frozen = [p for p in base if p == "embed" or "attn/" in p]
    assert len(frozen) == 5 and "moe_units/moe_block/mlp/w_up" in base
    for p in base:
        assert np.array_equal(base[p], tuned[p]) == (p in frozen), p
    # the biases start at the base's and keep balancing: each step moves each by +-rate or 0
    biases = [_logged_bias(r) for r in metrics_io.read(cfg.run.dir) if "train_loss" in r]
    biases.append(_bias(_host(result["state"].buffers)))
    np.testing.assert_array_equal(biases[0], _bias(base_buffers))
    for before, after in zip(biases, biases[1:]):
        np.testing.assert_allclose(np.abs(after - before), RATE * (after != before), atol=1e-6)
    assert any(not np.array_equal(b, biases[0]) for b in biases[1:])
    np.testing.assert_allclose(
        result["val_loss"], _evaluator(cfg)(result["params"], _host(result["state"].buffers)), rtol=1e-5
    )


@pytest.mark.slow  # ~30-45 s on 2 busy cores: compiles a MoE fine-tuning step and two evals
def test_lora_gives_every_expert_its_own_factors(moe_base, tmp_path, tfds_dir):
    _, base_params, base_buffers, _ = moe_base
    cfg = _ft_config(
        moe_base,
        tmp_path,
        tfds_dir,
        "finetune.mode=lora",
        "finetune.lora_rank=2",
        "train.steps=2",
        "train.eval_every=2",
        "train.lr=1e-2",
    )
    adapter = adapters.build(cfg.finetune, loop.resolve(cfg, 66).model)
    assert integrity.tree_digest(
        adapter.merged(adapter.split(base_params, jax.random.key(0)))
    ) == integrity.tree_digest(base_params), "LoRA starts exactly at the base model"
    result = finetune.finetune(cfg)
    train = _host(result["state"].params["train"])
    unit = "moe_units/moe_block/"
    assert {f"{unit}mlp/w_gate", f"{unit}mlp/w_up", f"{unit}mlp/w_down", f"{unit}attn/wq"} <= train.keys()
    assert f"{unit}mlp/router" not in train
    ab = train[f"{unit}mlp/w_down"]  # (layers 2, experts 4, F 32, D 32)
    assert ab["a"].shape == (2, 4, 32, 2) and ab["b"].shape == (2, 4, 2, 32)
    base, merged = adapters.flatten(base_params), adapters.flatten(_host(result["params"]))
    for layer in range(2):
        for e in range(4):
            want = base[f"{unit}mlp/w_down"][layer, e] + (16.0 / 2) * ab["a"][layer, e] @ ab["b"][layer, e]
            np.testing.assert_allclose(merged[f"{unit}mlp/w_down"][layer, e], want, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(merged[f"{unit}mlp/w_down"], base[f"{unit}mlp/w_down"])
    for p in base:
        if p not in train:
            np.testing.assert_array_equal(merged[p], base[p], err_msg=p)
    np.testing.assert_allclose(
        result["val_loss"], _evaluator(cfg)(result["params"], _host(result["state"].buffers)), rtol=1e-5
    )


def test_lora_target_without_embed_axis_is_a_config_error():
    cfg = configs.load(
        None,
        TINY
        + MOE
        + ["model.vocab_size=128", "finetune.mode=lora", "finetune.lora_targets=mlp/bias$|moe_block/attn_norm"],
    )
    with pytest.raises(ConfigError, match=r"finetune.lora_targets matches moe_units/moe_block/attn_norm/scale"):
        adapters.build(cfg.finetune, cfg.model)


def test_moe_mismatches_with_the_base_are_config_errors(moe_base, tmp_path, tfds_dir):
    with pytest.raises(ConfigError, match=r"model.moe.router='softmax_topk' \(base 'sigmoid_bias'\)"):
        finetune.finetune(_ft_config(moe_base, tmp_path, tfds_dir, "model.moe.router=softmax_topk"))
    with pytest.raises(ConfigError, match=r"moe_units/moe_block/mlp/bias: base \(2, 4\) vs \(2, 2\)"):
        finetune.finetune(_ft_config(moe_base, tmp_path, tfds_dir, "model.moe.num_experts=2"))
    with pytest.raises(ConfigError, match=r"moe_units/moe_block/mlp/w_up: base \(2, 4, 32, 32\) vs missing"):
        finetune.finetune(_ft_config(moe_base, tmp_path, tfds_dir, "model.moe.num_experts=0"))
    assert not (tmp_path / "ft").exists(), "nothing may be written for bad input"


def test_shipped_moe_finetune_config_matches_its_pretrain():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    ft, base = configs.load(root / "shakespeare_moe_ft.yaml"), configs.load(root / "shakespeare_moe.yaml")
    assert ft.finetune.init_from and ft.data.dataset.endswith("heldout/train.txt")
    assert ft.model == base.model


def test_moe_finetune_resumes_bitwise_with_its_router_biases(moe_base, tmp_path, tfds_dir):
    import shutil

    cfg = _ft_config(
        moe_base, tmp_path, tfds_dir, "finetune.mode=freeze", "finetune.freeze=^embed$", "checkpoint.every=2"
    )
    straight = finetune.finetune(configs.replace(cfg, run={"dir": str(tmp_path / "straight")}))
    shutil.copytree(tmp_path / "straight", tmp_path / "ft")
    shutil.rmtree(tmp_path / "ft" / "checkpoints" / "4")  # as if stopped after saving step 2
    resumed = finetune.finetune(cfg)
    assert integrity.tree_digest(resumed["state"].params) == integrity.tree_digest(straight["state"].params)
    np.testing.assert_array_equal(_bias(_host(resumed["state"].buffers)), _bias(_host(straight["state"].buffers)))


@pytest.mark.slow  # two MoE LoRA fine-tunes, one of them on 8 devices
def test_sharded_moe_lora_finetune_equals_one_device(moe_base, tmp_path, tfds_dir):
    """LoRA factors (replicated) merged into expert-sharded weights: expert=4 x fsdp=2 ≡ 1 device."""
    lora = ("finetune.mode=lora", "finetune.lora_rank=2", "train.steps=3", "train.eval_every=3")
    one = finetune.finetune(_ft_config(moe_base, tmp_path / "one", tfds_dir, *lora))
    sharded = finetune.finetune(
        _ft_config(
            moe_base, tmp_path / "ep", tfds_dir, *lora, "mesh.devices=8", "mesh.data=1", "mesh.expert=4", "mesh.fsdp=2"
        )
    )
    np.testing.assert_allclose(sharded["val_loss"], one["val_loss"], rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(_host(one["params"])), jax.tree.leaves(_host(sharded["params"]))
    ):
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(_bias(_host(sharded["state"].buffers)), _bias(_host(one["state"].buffers)))
