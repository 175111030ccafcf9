"""The hand-written kernels of model/kernels.py equal their library references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podtrain.model import ModelConfig, Transformer, init_cache, kernels, transformer


def test_swiglu_value_and_grads_equal_autodiff_of_silu():
    kg, ku, kc = jax.random.split(jax.random.key(0), 3)
    gate, up = jax.random.normal(kg, (3, 5, 7)) * 4, jax.random.normal(ku, (3, 5, 7))
    cot = jax.random.normal(kc, (3, 5, 7))

    def ref(g, u):
        return jnp.sum(jax.nn.silu(g) * u * cot)

    def ours(g, u):
        return jnp.sum(kernels.swiglu(g, u) * cot)

    np.testing.assert_allclose(ours(gate, up), ref(gate, up), rtol=1e-6)
    for got, want in zip(jax.grad(ours, (0, 1))(gate, up), jax.grad(ref, (0, 1))(gate, up)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec,x_shape,w_shape", [("BTD,DF->BTF", (2, 3, 20), (20, 6)), ("BTNH,NHF->BTF", (2, 3, 4, 5), (4, 5, 6))]
)
def test_project_and_its_backward_equal_the_einsum(spec, x_shape, w_shape):
    kx, kw, kc = jax.random.split(jax.random.key(2), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    cot = jax.random.normal(kc, (2, 3, 6))

    def want(x, w):
        return jnp.sum(jnp.einsum(spec, x, w) * cot)

    def got(x, w):
        return jnp.sum(kernels.project(x, w, len(w_shape) - 1) * cot)

    np.testing.assert_allclose(got(x, w), want(x, w), rtol=1e-5)
    for g, r in zip(jax.grad(got, (0, 1))(x, w), jax.grad(want, (0, 1))(x, w)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # the weight gradient comes out in the weight's own layout: no transpose in the backward
    jaxpr = str(jax.make_jaxpr(jax.grad(got, 1))(x, w))
    assert "transpose[" not in jaxpr, jaxpr


@pytest.mark.parametrize("blocks", [1, 2, 4])
@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (4, 1)])
def test_attention_and_its_backward_equal_dot_product_attention(n, k, blocks):
    kq, kk, kv, kc = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (2, 8, n, 8)) * 2
    key, val = jax.random.normal(kk, (2, 8, k, 8)) * 2, jax.random.normal(kv, (2, 8, k, 8))
    cot = jax.random.normal(kc, (2, 8, n, 8))

    def want(q, key, val):
        return jnp.sum(jax.nn.dot_product_attention(q, key, val, is_causal=True) * cot)

    def got(q, key, val):
        return jnp.sum(kernels.attention(q, key, val, transformer._causal_mask(8), causal=True, blocks=blocks) * cot)

    np.testing.assert_allclose(
        kernels.attention(q, key, val, transformer._causal_mask(8), causal=True, blocks=blocks),
        jax.nn.dot_product_attention(q, key, val, is_causal=True),
        rtol=1e-5,
        atol=1e-6,
    )
    for g, w in zip(jax.grad(got, (0, 1, 2))(q, key, val), jax.grad(want, (0, 1, 2))(q, key, val)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks", [1, 4])
def test_blocked_attention_keeps_packed_sequences_apart(blocks):
    """Query blocks with a segment mask (packed sequences): each sequence's output and gradients
    equal attention over that sequence alone."""
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q, key, val = (jax.random.normal(r, (1, 8, 2, 4)) for r in (kq, kk, kv))
    segments = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    mask = transformer._causal_mask(8) & (segments[:, :, None] == segments[:, None, :])

    def packed(q, key, val):
        return kernels.attention(q, key, val, mask, causal=True, blocks=blocks)

    def alone(q, key, val):
        first = kernels.attention(q[:, :3], key[:, :3], val[:, :3], transformer._causal_mask(3), causal=True, blocks=1)
        second = kernels.attention(q[:, 3:], key[:, 3:], val[:, 3:], transformer._causal_mask(5), causal=True, blocks=1)
        return jnp.concatenate([first, second], axis=1)

    np.testing.assert_allclose(packed(q, key, val), alone(q, key, val), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    for g, w in zip(jax.grad(loss(packed), (0, 1, 2))(q, key, val), jax.grad(loss(alone), (0, 1, 2))(q, key, val)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_query_blocks_on_cpu_are_at_least_64_rows_and_at_most_8():
    assert [kernels.query_blocks(t) for t in (32, 64, 100, 128, 192, 256, 1024, 4096)] == [1, 1, 1, 2, 3, 4, 8, 8]
    with pytest.raises(ValueError, match="blocks=3"):
        kernels.attention(*(jnp.zeros((1, 8, 2, 4)),) * 3, transformer._causal_mask(8), causal=True, blocks=3)


def test_kv_cache_decode_equals_full_forward():
    cfg = ModelConfig(vocab_size=11, num_layers=2, d_model=16, num_heads=4, num_kv_heads=2, mlp_dim=24)
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
    full, _ = model(tokens)
    cache = init_cache(cfg, 2, 10)
    logits, cache = model(tokens[:, :4], cache=cache, cache_index=0)
    steps = [logits]
    for i in range(4, 7):
        logits, cache = model(tokens[:, i : i + 1], cache=cache, cache_index=i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
