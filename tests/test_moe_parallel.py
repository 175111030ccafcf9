"""Expert parallelism: 3 training steps sharded over experts (and FSDP) equal 3 steps on one device."""

import functools

import jax
import numpy as np
import pytest

from podtrain.parallel import mesh as meshes
from podtrain.parallel import rules
from podtrain.train import config as configs
from podtrain.train import optim
from podtrain.train import state as states
from podtrain.train import step as steps

MOE = [
    "model.moe.num_experts=8",
    "model.moe.top_k=2",
    "model.moe.expert_mlp_dim=24",
    "model.moe.router=sigmoid_bias",
    "model.moe.n_groups=4",
    "model.moe.topk_groups=2",
    "model.moe.routed_scaling=1.5",
    "model.moe.num_shared_experts=1",
    "model.moe.load_balance_coef=0.01",
    "model.moe.z_loss_coef=0.001",
    "model.moe.bias_update_rate=0.01",
    "model.moe.first_dense_layers=1",
    "model.moe.every=2",
    "model.moe.block_size=8",
]
BASE = [
    "model.vocab_size=32",
    "model.num_layers=3",
    "model.d_model=32",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.mlp_dim=48",
    "train.batch_size=8",
    "train.warmup_steps=0",
    "train.lr=1e-3",
]
MESHES = {
    "expert4": ["mesh.devices=4", "mesh.data=1", "mesh.expert=4"],
    "expert2_fsdp2": ["mesh.devices=8", "mesh.data=-1", "mesh.expert=2", "mesh.fsdp=2"],
}
DISPATCH = {
    "dropless": ["model.moe.dispatch=dropless"],  # blocked on CPU
    "dropless_ragged": ["model.moe.dispatch=dropless", "model.moe.dropless_impl=ragged"],  # the TPU/GPU path
    "capacity": ["model.moe.dispatch=capacity", "model.moe.capacity_factor_train=1.0"],
}


@functools.cache
def train_3_steps(mesh: str, dispatch: str):
    cfg = configs.load(None, BASE + MOE + DISPATCH[dispatch] + MESHES.get(mesh, ["mesh.devices=1"]))
    m = meshes.build_mesh(cfg.mesh)
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, m)
    train_step = steps.make_train_step(lay, tx, cfg.train, cfg.model)
    state = states.init_state(cfg.model, tx, lay, seed=0)
    losses, dropped = [], []
    for i in range(3):
        tokens = jax.random.randint(jax.random.key(i), (8, 17), 0, 32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        state, out = train_step(state, jax.device_put(batch, rules.batch_sharding(m)))
        losses.append(float(out["train_loss"]))
        dropped.append(float(out["moe"]["dropped"].mean()))
    return jax.device_get(state.params), jax.device_get(state.buffers), losses, dropped


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", list(DISPATCH))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_expert_parallel_matches_one_device(mesh, dispatch):
    params, buffers, losses, dropped = train_3_steps(mesh, dispatch)
    ref_params, ref_buffers, ref_losses, ref_dropped = train_3_steps("one_device", dispatch)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(dropped, ref_dropped, atol=1e-7)
    if dispatch == "capacity":
        assert max(dropped) > 0, "the capacity case must drop tokens to test the drop rule"
    # Per tensor, relative to its norm: Adam's first steps (update ~ lr * g / |g|) turn the
    # float32 reordering noise of near-zero gradient entries into single entries that differ
    # by ~1e-4 relative, so an elementwise rtol would test Adam's noise amplification instead.
    errors = jax.tree.map(lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b), params, ref_params)
    worst = max(jax.tree.leaves(errors))
    assert worst < 1e-5, errors
    jax.tree.map(np.testing.assert_array_equal, buffers, ref_buffers)  # sign of integer load differences
    assert np.abs(jax.tree.leaves(buffers)[0]).sum() > 0, "the router bias must have moved"
