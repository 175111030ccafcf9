"""Every MoE router x dispatch path against a slow per-token loop reference (outputs and grads)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podtrain.model import moe as moe_lib
from podtrain.model.config import ModelConfig, MoEConfig

jax.config.update("jax_enable_x64", False)

MODEL = ModelConfig(num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, mlp_dim=24, vocab_size=32)
B, T = 2, 6

ROUTERS = {
    "softmax_renorm": dict(router="softmax_topk", top_k=2, normalize_topk=True),
    "softmax_plain_k1": dict(router="softmax_topk", top_k=1, normalize_topk=False),
    "softmax_plain_k2": dict(router="softmax_topk", top_k=2, normalize_topk=False),
    "sigmoid_bias_groups": dict(
        router="sigmoid_bias", top_k=3, normalize_topk=True, n_groups=4, topk_groups=2, routed_scaling=2.5
    ),
    "sigmoid_bias_plain": dict(router="sigmoid_bias", top_k=2, normalize_topk=False),
}
DISPATCH = {
    "ragged": dict(dispatch="dropless", dropless_impl="ragged"),
    "blocked": dict(dispatch="dropless", dropless_impl="blocked", block_size=4),
    "capacity_cf2": dict(dispatch="capacity", capacity_factor_train=2.0),
    "capacity_cf0.5": dict(dispatch="capacity", capacity_factor_train=0.5),
}


# ------------------------------------------------------------------------ the slow reference


def _choices(x_TD, p, cfg: MoEConfig) -> list[list[int]]:
    """Each token's experts, best first, in numpy: sort the selection scores, one token at a time."""
    x = np.asarray(x_TD, np.float64)
    out = []
    for t in range(x.shape[0]):
        logits = x[t] @ np.asarray(p["router"], np.float64)
        if cfg.router == "softmax_topk":
            select = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        else:
            select = 1 / (1 + np.exp(-logits)) + np.asarray(p["bias"], np.float64)
        size = cfg.num_experts // cfg.n_groups
        groups = sorted(range(cfg.n_groups), key=lambda g: -np.sort(select[g * size : (g + 1) * size])[::-1][:2].sum())[
            : cfg.topk_groups
        ]
        allowed = [e for e in range(cfg.num_experts) if e // size in groups]
        out.append(sorted(allowed, key=lambda e: -select[e])[: cfg.top_k])
    return out


def _swiglu(x_D, gate_DF, up_DF, down_FD):
    return (jax.nn.silu(x_D @ gate_DF) * (x_D @ up_DF)) @ down_FD


def _kept(choices: list[list[int]], cfg: MoEConfig, t: int) -> list[list[bool]]:
    """Capacity rule: per sequence, an expert takes its first C (token, choice) pairs in order."""
    cap = math.ceil(cfg.capacity_factor_train * t * cfg.top_k / cfg.num_experts)
    kept = []
    for s in range(0, len(choices), t):
        used = [0] * cfg.num_experts
        for chosen in choices[s : s + t]:
            kept.append([])
            for c in chosen:
                used[c] += 1
                kept[-1].append(cfg.dispatch == "dropless" or used[c] <= cap)
    return kept


def reference(p, x_BTD, cfg: MoEConfig, choices: list[list[int]]):
    """(y_BTD, aux_loss): a loop over tokens and their chosen experts."""
    b, t, _ = x_BTD.shape
    e, k = cfg.num_experts, cfg.top_k
    kept = _kept(choices, cfg, t)
    rows, counts = [], np.zeros(e)
    probs_sum, z_sum = jnp.zeros(e), 0.0
    for s in range(b):
        for i in range(t):
            x = x_BTD[s, i]
            logits = x @ p["router"]
            scores = jax.nn.softmax(logits) if cfg.router == "softmax_topk" else jax.nn.sigmoid(logits)
            probs_sum = probs_sum + scores / scores.sum()
            z_sum = z_sum + jax.nn.logsumexp(logits) ** 2
            chosen = choices[s * t + i]
            weights = [scores[c] for c in chosen]
            if cfg.normalize_topk:
                total = sum(weights)
                weights = [w / total for w in weights]
            y = jnp.zeros_like(x)
            for c, w, keep in zip(chosen, weights, kept[s * t + i]):
                counts[c] += 1
                if keep:
                    y = y + cfg.routed_scaling * w * _swiglu(x, p["w_gate"][c], p["w_up"][c], p["w_down"][c])
            if "shared_gate" in p:
                y = y + _swiglu(x, p["shared_gate"], p["shared_up"], p["shared_down"])
            rows.append(y)
    n = b * t
    lb = e * jnp.sum(jnp.asarray(counts / (n * k)) * probs_sum / n)
    aux = cfg.load_balance_coef * lb + cfg.z_loss_coef * z_sum / n
    return jnp.stack(rows).reshape(x_BTD.shape), aux


# ---------------------------------------------------------------------------------- helpers


def _build(cfg: MoEConfig, seed=0):
    with nnx.use_eager_sharding(False):
        layer = moe_lib.MoE(dataclasses.replace(MODEL, moe=cfg), rngs=nnx.Rngs(params=seed))
    layer.router[...] = layer.router[...] * 20.0  # decisive routing, so drops and groups matter
    layer.bias[...] = jax.random.uniform(jax.random.key(7), layer.bias.shape, minval=-0.3, maxval=0.3)
    return layer


def _split(layer):
    """(graphdef, {attribute name: array}): the reference reads the same names."""
    graphdef, state = nnx.split(layer)
    return graphdef, nnx.to_pure_dict(state)


def _apply(graphdef, p, x_BTD):
    return nnx.merge(graphdef, p)(x_BTD)


def _moe_cfg(router: str, dispatch: str, **extra) -> MoEConfig:
    base = dict(num_experts=8, expert_mlp_dim=12, load_balance_coef=0.01, z_loss_coef=0.001)
    return MoEConfig(**base | ROUTERS[router] | DISPATCH[dispatch] | extra)


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("dispatch", list(DISPATCH))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_matches_loop_reference(router, dispatch):
    shared = router in ("softmax_renorm", "sigmoid_bias_groups")
    cfg = _moe_cfg(router, dispatch, num_shared_experts=2 if shared else 0, shared_mlp_dim=8)
    graphdef, p = _split(_build(cfg))
    x = jax.random.normal(jax.random.key(1), (B, T, MODEL.d_model))
    cot = jax.random.normal(jax.random.key(2), x.shape)

    def fast_loss(p, x):
        y, stats = _apply(graphdef, p, x)
        return jnp.sum(y * cot) + stats["aux_loss"], (y, stats)

    choices = _choices(x.reshape(B * T, -1), p, cfg)

    def ref_loss(p, x):
        y, aux = reference(p, x, cfg, choices)
        return jnp.sum(y * cot) + aux, y

    grads = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)  # noqa: E731
    (lf, (y_fast, stats)), g_fast = jax.jit(grads(fast_loss))(p, x)
    (lr, y_ref), g_ref = grads(ref_loss)(p, x)  # eager: compiling the unrolled loop is slower
    dropped = 1 - np.mean(_kept(choices, cfg, T))
    np.testing.assert_allclose(y_fast, y_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lf, lr, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(stats["dropped"], dropped, atol=1e-6)
    if dispatch == "capacity_cf0.5":
        assert dropped > 0.1, "cf < 1 must drop tokens"
    elif dispatch != "capacity_cf2":
        assert dropped == 0
    g_fast[0].pop("bias"), g_ref[0].pop("bias")
    assert set(g_ref[0]) == set(g_fast[0])
    for name in g_ref[0]:
        np.testing.assert_allclose(g_fast[0][name], g_ref[0][name], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(g_fast[1], g_ref[1], atol=1e-5, rtol=0)


def test_bias_update_moves_toward_balance():
    load_LE = jnp.array([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    bias = moe_lib.update_router_bias(jnp.zeros((2, 4)), load_LE, 0.1)
    np.testing.assert_allclose(bias, [[-0.1, 0.0, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])


def test_router_bias_is_a_buffer_outside_the_optimizer():
    from podtrain.train import config as configs
    from podtrain.train import optim
    from podtrain.train import state as states

    cfg = configs.load(
        None, ["model.vocab_size=32", "model.moe.num_experts=4", "model.moe.router=sigmoid_bias", "mesh.devices=1"]
    )
    tx = optim.optimizer(cfg.train)
    lay = states.layout(
        cfg.model,
        tx,
        jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "expert", "tensor")),
    )
    bias_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lay.abstract.buffers)[0]]
    assert bias_paths == ["['moe_units']['moe_block']['mlp']['bias']"]
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lay.abstract.opt_state)[0]]
    assert not any("bias" in p for p in opt_paths)
    assert jax.tree.leaves(lay.abstract.buffers)[0].shape == (cfg.model.num_layers, 4)


def test_eval_uses_the_eval_capacity_factor():
    cfg = _moe_cfg("softmax_renorm", "capacity_cf0.5", capacity_factor_eval=8.0)
    graphdef, p = _split(_build(cfg))
    x = jax.random.normal(jax.random.key(1), (B, T, MODEL.d_model))
    layer = nnx.merge(graphdef, p)
    assert float(layer(x)[1]["dropped"]) > 0.1
    layer.eval()
    assert float(layer(x)[1]["dropped"]) == 0.0  # C = 8 * T * k / E >= T: nothing can drop
