"""Properties of the transformer against references: causality, scan ≡ unrolled, remat ≡ none,
jit ≡ eager. Tiny fp32 models on one CPU device."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podtrain.model import ModelConfig, Transformer
from podtrain.model.config import REMAT_POLICIES
from podtrain.train.step import lm_loss

B, T = 2, 8
CFG = ModelConfig(vocab_size=B * T, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64)


def build(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, parameters as a pure dict of arrays), as the train step holds them."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=seed)))
    return graphdef, nnx.to_pure_dict(state)


def tokens_and_targets(cfg: ModelConfig, seed: int = 1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k1, (B, T), 0, cfg.vocab_size)
    targets = jax.random.randint(k2, (B, T), 0, cfg.vocab_size)
    return tokens, targets


def logits_fn(graphdef):
    return lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0]


def loss_and_grads_fn(graphdef):
    """(params, tokens, targets) -> ((loss, logits), grads)."""

    def loss(params, tokens, targets):
        logits = nnx.merge(graphdef, params)(tokens)[0]
        return lm_loss(logits, targets)[0], logits

    return jax.value_and_grad(loss, has_aux=True)


@functools.cache
def jitted_results(cfg: ModelConfig):
    """(params, logits, loss, grads) of one jitted forward + backward; cached across tests."""
    graphdef, params = build(cfg)
    (loss, logits), grads = jax.jit(loss_and_grads_fn(graphdef))(params, *tokens_and_targets(cfg))
    return params, logits, loss, grads


def assert_same_results(actual, expected) -> None:
    """Same parameters (else nothing is compared), then fp32-tight logits, loss and gradients."""
    (p_a, logits_a, loss_a, grads_a), (p_e, logits_e, loss_e, grads_e) = actual, expected
    jax.tree.map(np.testing.assert_array_equal, p_a, p_e)
    assert_trees_close(logits_a, logits_e, rtol=1e-6)
    np.testing.assert_allclose(loss_a, loss_e, rtol=1e-6)
    assert_trees_close(grads_a, grads_e, rtol=1e-5)


def assert_trees_close(actual, expected, rtol: float) -> None:
    """Every leaf within rtol of the expected leaf, relative to that leaf's largest entry."""
    flat_a, flat_e = jax.tree.leaves_with_path(actual), jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        e = np.asarray(e)
        assert np.abs(e).max() > 0, f"{jax.tree_util.keystr(path)} is all zeros: nothing is compared"
        np.testing.assert_allclose(
            np.asarray(a), e, rtol=rtol, atol=rtol * np.abs(e).max(), err_msg=jax.tree_util.keystr(path)
        )


def test_loss_at_t_has_zero_gradient_from_later_tokens():
    # Untied embeddings and B*T distinct tokens: the gradient w.r.t. embedding row tokens[b, j]
    # is exactly the gradient w.r.t. the input embedding at (b, j).
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    graphdef, params = build(cfg)
    tokens = jax.random.permutation(jax.random.key(2), B * T).reshape(B, T)
    targets = tokens_and_targets(cfg)[1]

    def nll_BT(embed_VD):
        logits = nnx.merge(graphdef, {**params, "embed": embed_VD})(tokens)[0]
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]

    jac_BTVD = jax.jit(jax.jacrev(nll_BT))(params["embed"])
    grad_norm = np.linalg.norm(np.asarray(jac_BTVD), axis=-1)  # B T V: |d loss[b,t] / d embed[v]|
    for b in range(B):
        for t in range(T):
            for b2 in range(B):
                for j in range(T):
                    g = grad_norm[b, t, int(tokens[b2, j])]
                    if b2 == b and j <= t:
                        assert g > 0, f"loss[{b},{t}] ignores token {j}"
                    else:
                        assert g == 0, f"loss[{b},{t}] depends on token ({b2},{j}): |grad|={g}"


@pytest.mark.parametrize("scan_layers", ["scan", "unroll"])
def test_changing_a_future_token_leaves_earlier_logits_bit_identical(scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    graphdef, params = build(cfg)
    forward = jax.jit(logits_fn(graphdef))
    tokens = tokens_and_targets(cfg)[0]
    t0 = T // 2
    changed = tokens.at[:, t0].set((tokens[:, t0] + 1) % cfg.vocab_size)
    before, after = np.asarray(forward(params, tokens)), np.asarray(forward(params, changed))
    np.testing.assert_array_equal(after[:, :t0], before[:, :t0])
    assert np.abs(after[:, t0:] - before[:, t0:]).max() > 0, "the changed token had no effect at all"


def test_scan_equals_unrolled():
    assert_same_results(
        jitted_results(dataclasses.replace(CFG, scan_layers="scan")),
        jitted_results(dataclasses.replace(CFG, scan_layers="unroll")),
    )


# Remat wraps the same per-layer function whether the layer loop is rolled or not: every policy
# is checked under scan (the TPU/GPU default, where remat matters) and one under unroll.
REMAT_CASES = [(p, "scan") for p in REMAT_POLICIES if p != "none"] + [("full", "unroll")]


@pytest.mark.parametrize("policy,scan_layers", REMAT_CASES)
def test_remat_equals_no_remat(policy, scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    assert_same_results(
        jitted_results(dataclasses.replace(cfg, remat=policy)), jitted_results(dataclasses.replace(cfg, remat="none"))
    )


def test_every_remat_policy_is_covered():
    assert {p for p, _ in REMAT_CASES} == set(REMAT_POLICIES) - {"none"}


def test_jit_equals_eager():
    # Unrolled: eager nnx.scan runs a slow Python loop, and scan ≡ unrolled is checked under jit.
    cfg = dataclasses.replace(CFG, scan_layers="unroll")
    graphdef, params = build(cfg)
    with jax.disable_jit():
        (loss, logits), grads = loss_and_grads_fn(graphdef)(params, *tokens_and_targets(cfg))
    assert_same_results(jitted_results(cfg), (params, logits, loss, grads))
