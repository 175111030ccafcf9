"""Sharded training ≡ one device: 3 steps on 8 fake CPU devices, params and losses (fp32, rtol 1e-5).

Also gradient accumulation: k microbatches ≡ the full batch.

Parameters are compared with rtol 1e-5 of each tensor's largest entry (atol = rtol * max|ref|):
a sharded run sums gradients in another order, and Adam's m/sqrt(v) turns that float rounding of
small, cancelling gradients into relative differences of up to ~1e-3 in entries near zero, while
every entry stays within ~3e-6 of its tensor's scale (measured). A missing or doubled reduction
moves entries by O(1) of that scale.
"""

import jax
import numpy as np
import pytest

from podtrain.parallel import rules
from podtrain.train import config as configs
from podtrain.train import optim, validate
from podtrain.train import state as states
from podtrain.train import step as steps
from podtrain.train.loop import global_batch

STEPS, BATCH, SEQ, VOCAB = 3, 16, 16, 64
# Dims divide every degree used below: 4 heads, 4 kv heads, d_model 64, mlp 128, vocab 64.
MODEL = [
    "model.num_layers=2",
    "model.d_model=64",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.mlp_dim=128",
    f"model.vocab_size={VOCAB}",
    f"data.seq_len={SEQ}",
    f"train.batch_size={BATCH}",
    f"train.steps={STEPS}",
    "train.warmup_steps=1",
]
LAYOUTS = {
    "data=8": ["mesh.data=8"],
    "fsdp=8": ["mesh.data=1", "mesh.fsdp=8"],
    "tensor=4 x data=2": ["mesh.data=2", "mesh.tensor=4"],
    "fsdp=2 x tensor=2 x data=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "dcn data=2 x ici fsdp=4": ["mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=4"],
}
RTOL = 1e-5


def batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (STEPS, BATCH, SEQ + 1), dtype=np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def train(*overrides: str):
    """(losses, params as numpy) after STEPS steps of the config made of MODEL + overrides."""
    cfg = configs.load(None, MODEL + list(overrides))
    mesh = validate.build_mesh(cfg)
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, mesh)
    state = states.init_state(cfg.model, tx, lay, cfg.train.seed)
    train_step = steps.make_train_step(lay, tx, cfg.train, cfg.model)
    sharding, losses = rules.batch_sharding(mesh), []
    for batch in batches():
        state, out = train_step(state, global_batch(batch, sharding, BATCH))
        losses.append(float(out["train_loss"]))
    return np.array(losses), jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture(scope="module")
def one_device():
    return train("mesh.devices=1")


def assert_same_run(run, reference):
    losses, params = run
    ref_losses, ref_params = reference
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)
    worst = max(np.abs(x - ref).max() / np.abs(ref).max() for (_, x), ref in zip(flat, ref_flat))
    print(
        f"max |loss - ref| / |ref| = {np.max(np.abs(losses - ref_losses) / np.abs(ref_losses)):.1e}, "
        f"max |param - ref| / max|ref| = {worst:.1e}"
    )  # shown with pytest -s
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    for (path, x), ref in zip(flat, ref_flat, strict=True):
        np.testing.assert_allclose(x, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max(), err_msg=jax.tree_util.keystr(path))


def test_training_moves_the_params(one_device):
    """Guards the comparisons below: 3 steps move every tensor by far more than the tolerance."""
    losses, params = one_device
    cfg = configs.load(None, MODEL + ["mesh.devices=1"])
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, validate.build_mesh(cfg))
    init = jax.device_get(states.init_state(cfg.model, tx, lay, cfg.train.seed).params)
    for x, x0 in zip(jax.tree.leaves(params), jax.tree.leaves(init)):
        assert np.abs(x - x0).max() > 10 * RTOL * np.abs(x0).max()
    assert len(set(losses)) == STEPS


# Each run compiles once (~8 s CPU, more wall time on a busy machine): one layout stays fast.
@pytest.mark.parametrize(
    "layout", [pytest.param(name, marks=() if "tensor=2" in name else pytest.mark.slow) for name in LAYOUTS]
)
def test_sharded_run_equals_one_device(layout, one_device):
    assert_same_run(train(*LAYOUTS[layout]), one_device)


@pytest.mark.parametrize(
    "mesh", [["mesh.devices=1"], pytest.param(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], marks=pytest.mark.slow)]
)
def test_grad_accumulation_equals_full_batch(mesh, one_device):
    assert_same_run(train("train.grad_accum_steps=4", *mesh), one_device)


@pytest.mark.slow
def test_dims_the_tensor_degree_does_not_divide_still_match():
    """2 kv heads and a vocab of 65 on tensor=4: those stay whole (or compiler-placed), results equal."""
    odd = ["model.num_kv_heads=2", "model.vocab_size=65"]
    assert_same_run(train(*odd, "mesh.data=2", "mesh.tensor=4"), train(*odd, "mesh.devices=1"))


@pytest.mark.slow
def test_blocked_attention_sharded_run_equals_one_device():
    """The CPU's causal query blocks (`model.attention_blocks`, auto from T = 128) under tensor=4 x data=2."""
    blocked = ["model.attention_blocks=4"]
    assert_same_run(train(*blocked, *LAYOUTS["tensor=4 x data=2"]), train(*blocked, "mesh.devices=1"))
