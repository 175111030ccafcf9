"""Attention and matmul kernels: what the model computes, written for speed rather than for reading.

The model's modules (model/transformer.py, model/moe.py) say what is computed; the functions here
say how, with backward passes of their own where autodiff's is slow. Each is a drop-in for a plain
einsum or activation and equal to it within float rounding (tests/test_model_kernels.py).

- `attention` is the model's one entry point to attention: it picks the implementation from the
  config's setting, the backend and whether the blocked path applies. Today that is one full
  block, or on CPU causal query blocks with a flash-style backward. A fused backend kernel is one
  more branch in `attention`; the model never asks which backend it runs on.
- `project` and `swiglu` are the projections and the gated activation of every layer, with
  backwards of their own that XLA:CPU runs faster than autodiff's; every backend runs them.
"""

import functools
import math

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------------------------ activation


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, whose backward reuses the forward's sigmoid (no exp in the backward)."""
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_fwd(gate, up):
    sig = jax.nn.sigmoid(gate)
    return gate * sig * up, (gate, up, sig)


def _swiglu_bwd(res, g):
    gate, up, sig = res
    silu = gate * sig
    d_gate = g * up * (sig + silu * (1 - sig))  # d silu / d gate = sig * (1 + gate * (1 - sig))
    return d_gate.astype(gate.dtype), (g * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ---------------------------------------------------------------------------------- projections


def project(x, w, n_in: int = 1):
    """x @ w over x's last n_in axes and w's first n_in, as one 2-D matmul on flattened tokens.

    The same as the einsum, but its backward stays 2-D as well: XLA:CPU then takes the weight
    gradient as one transposed-operand matmul instead of first copying the activation gradient
    into a transposed layout (a third of the CPU step went to such copies)."""
    lead, k = x.shape[: x.ndim - n_in], w.shape[:n_in]
    out = _matmul(x.reshape(-1, math.prod(k)), w.reshape(math.prod(k), -1))
    return out.reshape(*lead, *w.shape[n_in:])


@jax.custom_vjp
def _matmul(x_MK, w_KN):
    """x @ w whose weight gradient comes out as (K, N), the weight's own layout.

    Autodiff computes it as g^T x, (N, K), then transposes: XLA:CPU fused that transpose into
    the concatenation of the per-layer gradients of the stacked weights, and those transposing
    copies took 4% of the step's op time at the bench's large shape (a quarter of it after)."""
    return x_MK @ w_KN


def _matmul_fwd(x_MK, w_KN):
    return x_MK @ w_KN, (x_MK, w_KN)


def _matmul_bwd(res, g_MN):
    x_MK, w_KN = res
    dx_MK = jax.lax.dot_general(g_MN, w_KN, (((1,), (1,)), ((), ())))  # g w^T
    dw_KN = jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())))  # x^T g
    return dx_MK.astype(x_MK.dtype), dw_KN.astype(w_KN.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ------------------------------------------------------------------------------------ attention


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, causal: bool, blocks: int = 0) -> jax.Array:
    """Softmax attention (grouped-query) with scale 1/sqrt(H); logits and softmax in float32.

    The one place that chooses how attention runs. `causal`: self-attention over the same T
    tokens (T == S) with a mask inside the causal one (packed sequences allowed); False for
    anything else (a KV cache), which always runs in one full block. `blocks`
    (model.attention_blocks): query blocks of the causal path, 0 = auto (`query_blocks`).
    """
    nb = query_blocks(q_BTNH.shape[1], blocks) if causal else 1
    if nb > 1:
        return _attend_blocked(q_BTNH, k_BSKH, v_BSKH, mask_BTS, nb)
    return _attend_full(q_BTNH, k_BSKH, v_BSKH, mask_BTS)


def query_blocks(t: int, setting: int = 0) -> int:
    """How many query blocks causal self-attention over t tokens is cut into (see
    `_attend_blocked`): `setting` (model.attention_blocks) when > 0; auto (0): 1 on TPU/GPU, where
    attention belongs in a fused kernel, and on CPU blocks of at least 64 queries, at most 8 blocks.

    A causal score matrix cut into nb row blocks needs only block i's first (i+1)/nb of the keys,
    (nb+1)/(2 nb) of the full work: at the bench's large shape (T 256, 4 blocks) attention's
    forward and backward take 34 ms instead of 94 ms in one block."""
    if setting:
        return setting
    if jax.default_backend() != "cpu":
        return 1
    return max((nb for nb in range(1, 9) if t % nb == 0 and t // nb >= 64), default=1)


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _attend_full(q_BTNH, k_BSKH, v_BSKH, mask_BTS) -> jax.Array:
    """Attention in one block, differentiated by JAX.

    Written out rather than `jax.nn.dot_product_attention`: it keeps the grouped layout through
    the backward pass instead of vmapping over the group axis."""
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    logits_BKGTS = logits_BKGTS * jnp.float32(h**-0.5)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def _attend_blocked(q_BTNH, k_BSKH, v_BSKH, mask_BTS, blocks: int) -> jax.Array:
    """Causal self-attention cut into `blocks` query row blocks, each skipping its fully masked
    keys, with a backward of its own; the G query heads of a KV group are folded into one row
    axis, so each score matmul is one batched (B, K) dot."""
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    if t % blocks or k_BSKH.shape[1] != t:
        raise ValueError(f"blocks={blocks} needs causal self-attention with T ({t}) a multiple of it")
    q_BKGTH = q_BTNH.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    out_BKGTH = _attention(q_BKGTH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3), mask_BTS, blocks)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _row_blocks(t: int, nb: int) -> list[tuple[int, int]]:
    return [(i * t // nb, (i + 1) * t // nb) for i in range(nb)]


def _rows(x_BKGTH, lo: int, hi: int):
    """Queries lo:hi of a group's G heads folded into one axis, (B, K, G*(hi-lo), H): in the
    einsums below T stands for that folded axis."""
    b, k, g, _, h = x_BKGTH.shape
    return x_BKGTH[:, :, :, lo:hi].reshape(b, k, g * (hi - lo), h)


def _mask_rows(mask_BTS, g: int, lo: int, hi: int):
    """The mask of queries lo:hi over keys :hi, rows folded as in `_rows`."""
    m = mask_BTS[:, None, None, lo:hi, :hi]
    return jnp.broadcast_to(m, (m.shape[0], 1, g, hi - lo, hi)).reshape(m.shape[0], 1, g * (hi - lo), hi)


def _attend_blocks(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, nb: int):
    """Output (B, K, G, T, H) and each row block's probabilities (float32)."""
    b, k, g, t, h = q_BKGTH.shape
    outs, probs = [], []
    for lo, hi in _row_blocks(t, nb):  # keys after a block's last query (:hi) are all masked
        logits = jnp.einsum(
            "BKTH,BKSH->BKTS", _rows(q_BKGTH, lo, hi), k_BKSH[:, :, :hi], preferred_element_type=jnp.float32
        ) * jnp.float32(h**-0.5)
        p = jax.nn.softmax(jnp.where(_mask_rows(mask_BTS, g, lo, hi), logits, _MASKED), axis=-1)
        probs.append(p)
        out = jnp.einsum("BKTS,BKSH->BKTH", p.astype(v_BKSH.dtype), v_BKSH[:, :, :hi])
        outs.append(out.reshape(b, k, g, hi - lo, h))
    return jnp.concatenate(outs, axis=3), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, nb: int):
    return _attend_blocks(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, nb)[0]


def _attention_fwd(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, nb):
    out, probs = _attend_blocks(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, nb)
    return out, (q_BKGTH, k_BKSH, v_BKSH, out, probs)


def _attention_bwd(nb, res, d_out):
    """The softmax backward as in flash attention, dS = P * (dP - rowsum(dO * O)): masked scores
    have P = 0, so the mask needs no backward pass of its own."""
    q, k, v, out, probs = res
    t, s = q.shape[3], k.shape[2]
    dq, dk, dv = [], 0.0, 0.0
    pad = lambda x, hi: jnp.pad(x, ((0, 0), (0, 0), (0, s - hi), (0, 0)))  # keys >= hi: no gradient
    for (lo, hi), p in zip(_row_blocks(t, nb), probs):
        do, o, qr = _rows(d_out, lo, hi), _rows(out, lo, hi), _rows(q, lo, hi)
        dv = dv + pad(jnp.einsum("BKTS,BKTH->BKSH", p, do, preferred_element_type=jnp.float32), hi)
        dp = jnp.einsum("BKTH,BKSH->BKTS", do, v[:, :, :hi], preferred_element_type=jnp.float32)
        rowsum = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
        ds = (p * (dp - rowsum) * jnp.float32(q.shape[4] ** -0.5)).astype(q.dtype)
        dq.append(jnp.einsum("BKTS,BKSH->BKTH", ds, k[:, :, :hi]).reshape(*q.shape[:3], hi - lo, q.shape[4]))
        dk = dk + pad(jnp.einsum("BKTS,BKTH->BKSH", ds, qr, preferred_element_type=jnp.float32), hi)
    return jnp.concatenate(dq, axis=3), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
