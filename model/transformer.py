"""Decoder-only transformer: token embedding, RoPE, pre-norm RMSNorm, GQA attention, SwiGLU.

This file is the model's wiring: its modules, masks and KV cache, written to read like the math.
How attention, the projections and the activation are computed fast lives in model/kernels.py;
the modules call `kernels.attention`, `kernels.project` and `kernels.swiglu` and never ask which
backend they run on.

Layers are built with `nnx.vmap` (parameters stacked on a leading `layers` axis) and applied
with `nnx.scan`; `unroll` chooses between a rolled loop and straight-line code.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from podtrain.model import axes, kernels
from podtrain.model.config import ModelConfig
from podtrain.model.moe import MoE

Cache = dict[str, jax.Array]  # {'k': LBSKH, 'v': LBSKH}

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape, names, std: float | None) -> nnx.Param:
    init = nnx.initializers.ones if std is None else nnx.initializers.normal(stddev=std)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


Rope = tuple[jax.Array, jax.Array]  # cos, sin: (B, T, 1, H/2) each


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> Rope:
    """cos and sin of the rotary angles: computed once per forward and shared by all layers
    (inside a scan over layers XLA would otherwise recompute them in every layer)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle = positions_BT[..., None].astype(jnp.float32) * inv_freq  # B T H/2
    return jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]


def rope(x_BTNH: jax.Array, tables: Rope) -> jax.Array:
    """Rotary embedding in the rotate-half layout (as Llama in `transformers`)."""
    cos, sin = tables
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, (cfg.d_model,), (axes.NORM,), None)
        self.eps = cfg.norm_eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        # 1 / sqrt, not lax.rsqrt: XLA:CPU's rsqrt is a few ulp off, which doubled our logits'
        # distance from a float64 reference (1.2e-5 vs transformers' 5e-6 at logits ~6)
        x = x * (1.0 / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))
        return (x * self.scale[...]).astype(x_BTD.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.wq = _param(rngs, (d, n, h), (axes.EMBED, axes.Q_HEADS, axes.HEAD_DIM), std)
        self.wk = _param(rngs, (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), std)
        self.wv = _param(rngs, (d, k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), std)
        self.wo = _param(rngs, (n, h, d), (axes.Q_HEADS, axes.HEAD_DIM, axes.EMBED), out_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.query_blocks = cfg.attention_blocks

    def __call__(self, x_BTD, rope_BT: Rope, mask_BTS, cache=None, cache_index=None):
        """Self-attention; with `cache` ({'k','v'}: BSKH) writes this step's keys at cache_index."""
        dt = self.dtype
        q_BTNH = kernels.project(x_BTD, self.wq[...].astype(dt))
        k_BSKH = kernels.project(x_BTD, self.wk[...].astype(dt))
        v_BSKH = kernels.project(x_BTD, self.wv[...].astype(dt))
        q_BTNH = axes.constrain(rope(q_BTNH, rope_BT), _HEADS)
        k_BSKH = axes.constrain(rope(k_BSKH, rope_BT), _KV_HEADS)
        v_BSKH = axes.constrain(v_BSKH, _KV_HEADS)
        new_cache = None
        if cache is not None:
            at = (0, cache_index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(cache["k"], k_BSKH.astype(cache["k"].dtype), at)
            v_BSKH = jax.lax.dynamic_update_slice(cache["v"], v_BSKH.astype(cache["v"].dtype), at)
            new_cache = {"k": k_BSKH, "v": v_BSKH}
            k_BSKH, v_BSKH = k_BSKH.astype(dt), v_BSKH.astype(dt)
        out_BTNH = kernels.attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, causal=cache is None, blocks=self.query_blocks)
        out_BTD = kernels.project(out_BTNH, self.wo[...].astype(dt), 2)
        return out_BTD, new_cache


_HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None)
_KV_HEADS = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, None)
_BTD = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)
_BTF = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP)
_BTV = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.w_gate = _param(rngs, (d, f), (axes.EMBED, axes.MLP), cfg.init_std)
        self.w_up = _param(rngs, (d, f), (axes.EMBED, axes.MLP), cfg.init_std)
        self.w_down = _param(rngs, (f, d), (axes.MLP, axes.EMBED), out_std)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BTD):
        dt = self.dtype
        gate_BTF = kernels.project(x_BTD, self.w_gate[...].astype(dt))
        up_BTF = kernels.project(x_BTD, self.w_up[...].astype(dt))
        h_BTF = axes.constrain(kernels.swiglu(gate_BTF, up_BTF), _BTF)
        return kernels.project(h_BTF, self.w_down[...].astype(dt))


class Block(nnx.Module):
    """Attention then MLP; with `experts` the MLP is a mixture of experts (cfg.moe). Returns
    (x, cache, stats): stats are the MoE layer's routing statistics ({} for a dense MLP)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, experts: bool = False):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg, rngs=rngs)
        self.mlp = MoE(cfg, rngs=rngs) if experts else MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, rope_BT: Rope, mask_BTS, cache=None, cache_index=None):
        h_BTD, new_cache = self.attn(self.attn_norm(x_BTD), rope_BT, mask_BTS, cache, cache_index)
        x_BTD = axes.constrain(x_BTD + h_BTD, _BTD)
        if isinstance(self.mlp, MoE):
            h_BTD, stats = self.mlp(self.mlp_norm(x_BTD))
        else:
            h_BTD, stats = self.mlp(self.mlp_norm(x_BTD)), {}
        x_BTD = axes.constrain(x_BTD + h_BTD, _BTD)
        return x_BTD, new_cache, stats


class MoEUnit(nnx.Module):
    """The repeating unit of the MoE part of the stack: one MoE block, then every - 1 dense ones."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.moe_block = Block(cfg, rngs=rngs, experts=True)
        self.num_dense = cfg.moe.every - 1
        for i in range(self.num_dense):  # named attributes: int keys (nnx.List) break nnx.capture
            setattr(self, f"dense_{i}", Block(cfg, rngs=rngs))

    def __call__(self, x_BTD, rope_BT: Rope, mask_BTS, cache=None, cache_index=None):
        """cache: {'k', 'v'} with a leading axis over the unit's `every` layers."""
        caches, stats = [], {}
        dense = [getattr(self, f"dense_{i}") for i in range(self.num_dense)]
        for i, block in enumerate([self.moe_block, *dense]):
            layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
            x_BTD, new_cache, out = block(x_BTD, rope_BT, mask_BTS, layer_cache, cache_index)
            stats = out if i == 0 else stats  # the unit's statistics are its MoE block's
            caches.append(new_cache)
        new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
        return x_BTD, new_cache, stats


def _stack(n: int, make, rngs: nnx.Rngs):
    """n modules with parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
    def build(rngs):
        return make(rngs)

    return build(rngs)


class Transformer(nnx.Module):
    """Layers: `blocks`, a scanned stack of dense blocks (all layers when cfg.moe is off, else the
    first moe.first_dense_layers), then with cfg.moe `moe_units`, a scanned stack of MoEUnits.
    MoE routing statistics, stacked over MoE layers, are sown as `nnx.Intermediate` 'moe_stats'."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        moe = cfg.moe
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), (axes.VOCAB, axes.EMBED), cfg.init_std)
        n_dense = moe.first_dense_layers if moe.enabled else cfg.num_layers
        self.blocks = _stack(n_dense, lambda r: Block(cfg, rngs=r), rngs) if n_dense else None
        if moe.enabled:
            self.moe_units = _stack(cfg.num_moe_layers, lambda r: MoEUnit(cfg, rngs=r), rngs)
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), (axes.EMBED, axes.VOCAB), cfg.init_std)

    def __call__(self, tokens_BT, positions_BT=None, cache: Cache | None = None, cache_index=None, segment_ids_BT=None):
        """Logits (B, T, V) in float32, and the updated cache when one is given.

        With a cache, tokens sit at `positions_BT` (default cache_index + arange(T)) and
        their keys and values are written at cache_index. segment_ids_BT (no cache): packed
        sequences, attention stays within equal ids.
        """
        cfg = self.cfg
        t = tokens_BT.shape[1]
        if positions_BT is None:
            start = 0 if cache_index is None else cache_index
            positions_BT = jnp.broadcast_to(start + jnp.arange(t), tokens_BT.shape)
        x_BTD = axes.constrain(self.embed[...].astype(cfg.dtype)[tokens_BT], _BTD)

        rope_BT = rope_tables(positions_BT, cfg.resolved_head_dim, cfg.rope_theta)
        mask_BTS = _causal_mask(t) if cache is None else _cache_mask(positions_BT, cache["k"].shape[2])
        if segment_ids_BT is not None:
            mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])

        def layer(x_BTD, block, layer_cache):
            x_BTD, new_cache, stats = block(x_BTD, rope_BT, mask_BTS, layer_cache, cache_index)
            return x_BTD, (new_cache, stats)

        if cfg.remat != "none":
            layer = nnx.remat(layer, policy=REMAT[cfg.remat], prevent_cse=False)

        def run(stack, n, x_BTD, stack_cache):
            unroll = n if _unrolled(cfg) else 1
            scan = nnx.scan(layer, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), unroll=unroll)
            return scan(x_BTD, stack, stack_cache)

        moe = cfg.moe
        n_dense = moe.first_dense_layers if moe.enabled else cfg.num_layers
        dense_cache = None if cache is None else jax.tree.map(lambda c: c[:n_dense], cache)
        new_cache = None
        if n_dense:
            x_BTD, (new_cache, _) = run(self.blocks, n_dense, x_BTD, dense_cache)
        if moe.enabled:
            every, units = moe.every, cfg.num_moe_layers
            unit_cache = (
                None
                if cache is None
                else jax.tree.map(lambda c: c[n_dense:].reshape(units, every, *c.shape[1:]), cache)
            )
            x_BTD, (unit_new_cache, stats) = run(self.moe_units, units, x_BTD, unit_cache)
            self.sow(nnx.Intermediate, "moe_stats", stats)
            if cache is not None:
                flat = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), unit_new_cache)
                new_cache = (
                    flat if new_cache is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), new_cache, flat)
                )

        x_BTD = self.final_norm(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, self.embed[...].astype(cfg.dtype))
        else:
            logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.lm_head[...].astype(cfg.dtype))
        logits_BTV = axes.constrain(logits_BTV.astype(jnp.float32), _BTV)
        return logits_BTV, new_cache


def _causal_mask(t: int) -> jax.Array:
    """(1, T, T): query i sees keys j <= i."""
    return jnp.tril(jnp.ones((1, t, t), bool))


def _cache_mask(positions_BT: jax.Array, kv_len: int) -> jax.Array:
    """(B, T, S) over a cache of kv_len slots: a query at position p sees slots <= p."""
    return jnp.arange(kv_len)[None, None, :] <= positions_BT[:, :, None]


def _unrolled(cfg: ModelConfig) -> bool:
    if cfg.scan_layers == "auto":
        return jax.default_backend() == "cpu"
    return cfg.scan_layers == "unroll"


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
    zeros = functools.partial(jnp.zeros, shape, jnp.dtype(cfg.dtype))
    return {"k": zeros(), "v": zeros()}
