"""Mixture-of-experts MLP: routing, dispatch, expert compute and combine, as separate functions.

A token's k (token, expert) *pairs* flow through one pipeline shared by every path:

  route      fp32 router: top-k experts and weights per token (softmax_topk | sigmoid_bias)
  dispatch   each pair gets a destination row in an expert-major buffer (`dest_M`); rows past
             the buffer are dropped (a `Dispatch`). Three kinds:
               ragged   rows sorted by expert, one group per expert   (dropless, jax.lax.ragged_dot)
               blocked  like ragged, each expert's group padded to whole blocks of `block_size`
                        rows, every block owned by one expert         (dropless, CPU)
               capacity (E, C) slots per sequence, C = ceil(cf * T * k / E)
  experts    SwiGLU over the buffer with the dispatch kind's matmul (`expert_matmul`)
  combine    gather each pair's output row, weight it, sum a token's k pairs

Capacity drop rule: within each sequence, pairs claim an expert's C slots in position order,
(token 0 choice 0, token 0 choice 1, token 1 choice 0, ...); pairs past the C-th are dropped
and contribute nothing (the residual carries the token). Because the groups are sequences,
drops do not depend on how the batch is sharded.

Expert parallelism: with an `expert` mesh axis in the logical rules, the routed part runs
under `shard_map`; each device routes its own tokens, sends every pair to the device holding
its expert with an all-to-all, runs its E/ep local experts, and sends the results back.
Dropless exchange buffers hold every local pair for every peer (no drops, ep x the rows);
capacity buffers hold the capacity slots of the peer's experts.

Balancing statistics (loads, losses) are sums over the whole batch (psum across devices), so
they are the same on any mesh.
"""

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from podtrain.model import axes, kernels
from podtrain.model.config import ModelConfig, MoEConfig

F32 = jnp.float32


class RouterBias(nnx.Variable):
    """Per-expert selection bias (DeepSeek-V3): set by the train step outside the gradient,
    never by the optimizer."""


@dataclasses.dataclass(frozen=True)
class Routing:
    weights_TK: jax.Array  # float32 combine weights
    experts_TK: jax.Array  # int32 chosen experts, best first
    probs_TE: jax.Array  # float32 router distribution (for the load-balance loss and entropy)
    logits_TE: jax.Array  # float32 (for the z-loss)


# ----------------------------------------------------------------------------------- routing


def limit_groups(select_TE: jax.Array, n_groups: int, topk_groups: int) -> jax.Array:
    """Group-limited routing (DeepSeek-V3): keep the experts of the `topk_groups` groups whose
    two best selection scores sum highest; the others get -inf."""
    if topk_groups >= n_groups:
        return select_TE
    t, e = select_TE.shape
    g_TGX = select_TE.reshape(t, n_groups, e // n_groups)
    group_score_TG = jax.lax.top_k(g_TGX, min(2, e // n_groups))[0].sum(-1)
    _, keep_TK = jax.lax.top_k(group_score_TG, topk_groups)
    keep_TG = jax.nn.one_hot(keep_TK, n_groups, dtype=jnp.bool_).any(axis=1)
    return jnp.where(keep_TG[..., None], g_TGX, -jnp.inf).reshape(t, e)


def route(x_TD: jax.Array, w_router_DE: jax.Array, bias_E: jax.Array | None, cfg: MoEConfig) -> Routing:
    """Top-k routing in float32. softmax_topk: weights are softmax probabilities of the chosen
    experts; sigmoid_bias: the bias only changes which experts are chosen, weights come from
    the unbiased sigmoid scores. Either: renormalized if normalize_topk, times routed_scaling."""
    logits_TE = jnp.einsum("TD,DE->TE", x_TD.astype(F32), w_router_DE.astype(F32))
    if cfg.router == "softmax_topk":
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
        select_TE = scores_TE
        probs_TE = scores_TE
    else:
        scores_TE = jax.nn.sigmoid(logits_TE)
        select_TE = scores_TE + jax.lax.stop_gradient(bias_E.astype(F32))
        probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
    select_TE = limit_groups(select_TE, cfg.n_groups, cfg.topk_groups)
    _, experts_TK = jax.lax.top_k(select_TE, cfg.top_k)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if cfg.normalize_topk:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return Routing(weights_TK * cfg.routed_scaling, experts_TK.astype(jnp.int32), probs_TE, logits_TE)


# ---------------------------------------------------------------------------------- dispatch


def rank_in_group(group_M: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """(rank of each item among the items of its group in position order, group sizes)."""
    order_M = jnp.argsort(group_M, stable=True)
    sizes_G = jnp.bincount(group_M, length=num_groups)
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    m = group_M.shape[0]
    rank_sorted_M = jnp.arange(m) - starts_G[group_M[order_M]]
    return jnp.zeros(m, jnp.int32).at[order_M].set(rank_sorted_M.astype(jnp.int32)), sizes_G


def scatter_rows(rows_MD: jax.Array, dest_M: jax.Array, n_rows: int) -> jax.Array:
    """Buffer of n_rows with rows_MD[i] at dest_M[i]; destinations >= n_rows are dropped."""
    buf = jnp.zeros((n_rows, rows_MD.shape[-1]), rows_MD.dtype)
    return buf.at[dest_M].set(rows_MD, mode="drop", unique_indices=True)


def gather_rows(buf_RD: jax.Array, dest_M: jax.Array) -> jax.Array:
    """Row dest_M[i] of buf_RD, zeros for dropped destinations (>= its length)."""
    return buf_RD.at[dest_M].get(mode="fill", fill_value=0)


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The dispatch of a batch's pairs: where each pair's row goes in the expert buffer, and how
    the expert matmul reads the buffer."""

    dest_M: jax.Array  # int32; >= n_rows: dropped
    n_rows: int
    kind: str  # ragged | blocked | capacity
    group_sizes_E: jax.Array | None = None  # ragged
    block_expert_N: jax.Array | None = None  # blocked
    used_blocks: jax.Array | None = None  # blocked
    block: int = 0  # blocked
    num_experts: int = 0  # capacity


def ragged_dispatch(expert_M: jax.Array, num_experts: int) -> Dispatch:
    """Rows sorted by expert. expert_M == num_experts marks a pair to skip (it goes last)."""
    rank_M, sizes = rank_in_group(expert_M, num_experts + 1)
    starts = jnp.cumsum(sizes) - sizes
    valid = expert_M < num_experts
    dest_M = jnp.where(valid, starts[expert_M] + rank_M, expert_M.shape[0])
    return Dispatch(dest_M, expert_M.shape[0], "ragged", group_sizes_E=sizes[:num_experts].astype(jnp.int32))


def blocked_dispatch(expert_M: jax.Array, num_experts: int, block: int) -> Dispatch:
    """Rows sorted by expert, each expert's rows padded up to whole blocks (one expert per block).
    The buffer has room for the worst case; only the `used_blocks` first blocks are computed."""
    m = expert_M.shape[0]
    rank_M, sizes = rank_in_group(expert_M, num_experts + 1)
    blocks_E = -(-sizes[:num_experts] // block)
    ends_E = jnp.cumsum(blocks_E)
    starts_E = (ends_E - blocks_E) * block
    n_blocks = (m + num_experts * (block - 1)) // block
    valid = expert_M < num_experts
    dest_M = jnp.where(valid, starts_E[jnp.minimum(expert_M, num_experts - 1)] + rank_M, n_blocks * block)
    block_expert_N = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(n_blocks), side="right"), num_experts - 1)
    return Dispatch(
        dest_M,
        n_blocks * block,
        "blocked",
        block_expert_N=block_expert_N.astype(jnp.int32),
        used_blocks=ends_E[-1],
        block=block,
    )


def capacity_dispatch(expert_BM: jax.Array, num_experts: int, capacity: int) -> Dispatch:
    """C slots per expert per sequence, claimed in position order; buffer (E, B * C) rows."""
    b = expert_BM.shape[0]
    rank_BM, _ = jax.vmap(lambda e: rank_in_group(e, num_experts))(expert_BM)
    slot_BM = jnp.arange(b)[:, None] * capacity + rank_BM
    n_rows = num_experts * b * capacity
    dest_BM = jnp.where(rank_BM < capacity, expert_BM * (b * capacity) + slot_BM, n_rows)
    return Dispatch(dest_BM.reshape(-1), n_rows, "capacity", num_experts=num_experts)


def capacity(cfg: MoEConfig, tokens_per_group: int, train: bool) -> int:
    cf = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
    return max(1, math.ceil(cf * tokens_per_group * cfg.top_k / cfg.num_experts))


# ----------------------------------------------------------------------------- expert compute


@jax.custom_vjp
def blocked_matmul(x_NbD: jax.Array, w_EDF: jax.Array, expert_N: jax.Array, used: jax.Array) -> jax.Array:
    """out[n] = x[n] @ w[expert_N[n]] for the first `used` blocks, zeros after. A loop over blocks:
    its cost follows the rows actually routed, not E x the tokens (ragged_dot's CPU fallback)."""
    return _blocked_fwd(x_NbD, w_EDF, expert_N, used)[0]


def _varying(*like) -> set:
    """The manual mesh axes (under shard_map) over which any of `like` varies."""
    return set().union(*(jax.typeof(x).mat.varying for x in like))


def _varying_zeros(shape, dtype, *like):
    """Zeros that vary over the same manual mesh axes as `like` (a loop carry under shard_map)."""
    vma = _varying(*like)
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(sorted(vma)), to="varying") if vma else zeros


def _blocked_fwd(x_NbD, w_EDF, expert_N, used):
    out = _varying_zeros((*x_NbD.shape[:2], w_EDF.shape[-1]), x_NbD.dtype, x_NbD, w_EDF, expert_N)

    def body(n, out):
        y = jnp.dot(x_NbD[n], w_EDF[expert_N[n]], preferred_element_type=F32).astype(out.dtype)
        return jax.lax.dynamic_update_index_in_dim(out, y, n, 0)

    return jax.lax.fori_loop(0, used, body, out), (x_NbD, w_EDF, expert_N, used)


def _blocked_bwd(res, dy_NbF):
    x_NbD, w_EDF, expert_N, used = res

    def body(n, carry):
        dx, dw = carry
        e = expert_N[n]
        dx = jax.lax.dynamic_update_index_in_dim(dx, (dy_NbF[n] @ w_EDF[e].T).astype(dx.dtype), n, 0)
        dw_e = jax.lax.dynamic_index_in_dim(dw, e, 0, keepdims=False)
        dw_e = dw_e + jnp.dot(x_NbD[n].T, dy_NbF[n], preferred_element_type=F32)
        return dx, jax.lax.dynamic_update_index_in_dim(dw, dw_e, e, 0)

    like = (x_NbD, w_EDF, expert_N, dy_NbF)
    zero = (_varying_zeros(x_NbD.shape, x_NbD.dtype, *like), _varying_zeros(w_EDF.shape, F32, *like))
    dx, dw = jax.lax.fori_loop(0, used, body, zero)
    replicated = tuple(sorted(_varying(dw) - _varying(w_EDF)))
    if replicated:  # w is the same on these devices: its gradient is the sum of theirs
        dw = jax.lax.psum(dw, replicated)
    return dx, dw.astype(w_EDF.dtype), None, None


blocked_matmul.defvjp(_blocked_fwd, _blocked_bwd)


def expert_matmul(x_RD: jax.Array, w_EDF: jax.Array, disp: Dispatch) -> jax.Array:
    """The expert matmul of a buffer filled by `disp`: row r uses the weights of its expert."""
    if disp.kind == "ragged":
        return jax.lax.ragged_dot(x_RD, w_EDF, disp.group_sizes_E, preferred_element_type=F32).astype(x_RD.dtype)
    if disp.kind == "blocked":
        x_NbD = x_RD.reshape(-1, disp.block, x_RD.shape[-1])
        return blocked_matmul(x_NbD, w_EDF, disp.block_expert_N, disp.used_blocks).reshape(x_RD.shape[0], -1)
    x_ECD = x_RD.reshape(disp.num_experts, -1, x_RD.shape[-1])
    return jnp.einsum("ECD,EDF->ECF", x_ECD, w_EDF).reshape(x_RD.shape[0], -1)


def expert_ffn(x_RD: jax.Array, w: dict, disp: Dispatch) -> jax.Array:
    """SwiGLU of every buffer row with its expert's weights {'gate','up': EDF, 'down': EFD}."""
    gate_RF = expert_matmul(x_RD, w["gate"], disp)
    up_RF = expert_matmul(x_RD, w["up"], disp)
    return expert_matmul(kernels.swiglu(gate_RF, up_RF), w["down"], disp)


def shared_ffn(x_BTD: jax.Array, w: dict) -> jax.Array:
    """The shared experts: one dense SwiGLU FFN {'gate','up': DF, 'down': FD} that every token runs."""
    h_BTF = kernels.swiglu(x_BTD @ w["gate"], x_BTD @ w["up"])
    return h_BTF @ w["down"]


def run_experts(rows_MD: jax.Array, w: dict, disp: Dispatch) -> jax.Array:
    """Scatter rows into `disp`'s buffer, run the experts, bring each row's output back."""
    buf_RD = scatter_rows(rows_MD, disp.dest_M, disp.n_rows)
    return gather_rows(expert_ffn(buf_RD, w, disp), disp.dest_M)


def dropless_dispatch(expert_M: jax.Array, num_experts: int, cfg: MoEConfig) -> Dispatch:
    impl = cfg.dropless_impl
    if impl == "auto":
        impl = "blocked" if jax.default_backend() == "cpu" else "ragged"
    if impl == "ragged":
        return ragged_dispatch(expert_M, num_experts)
    return blocked_dispatch(expert_M, num_experts, cfg.block_size)


# ----------------------------------------------------------------------------------- combine


def combine(y_MD: jax.Array, weights_TK: jax.Array) -> jax.Array:
    """Sum of each token's k pair outputs (pair order: token-major) times their weights."""
    t, k = weights_TK.shape
    y_TKD = y_MD.reshape(t, k, -1).astype(F32)
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK)


# --------------------------------------------------------------------- routed part, per device


def routed(x_BTD, w_router, bias_E, w_experts, cfg: MoEConfig, train: bool, expert_axis, batch_axes):
    """Routed experts' output (B, T, D) and batch statistics for this device's tokens.

    With `expert_axis` (inside shard_map), w_experts holds this device's E / ep experts and
    pairs travel to their expert's device and back by all-to-all.
    """
    b, t, d = x_BTD.shape
    e, k = cfg.num_experts, cfg.top_k
    x_TD = x_BTD.reshape(b * t, d)
    r = route(x_TD, w_router, bias_E, cfg)
    rows_MD = jnp.repeat(x_TD, k, axis=0)
    expert_M = r.experts_TK.reshape(-1)
    ep = jax.lax.axis_size(expert_axis) if expert_axis else 1
    kept_M = jnp.ones_like(expert_M, jnp.bool_)
    if cfg.dispatch == "capacity":
        disp = capacity_dispatch(expert_M.reshape(b, t * k), e, capacity(cfg, t, train))
        kept_M = disp.dest_M < disp.n_rows
        if ep == 1:
            y_MD = run_experts(rows_MD, w_experts, disp)
        else:
            y_MD = _capacity_exchange(rows_MD, w_experts, disp, e // ep, expert_axis)
    elif ep == 1:
        y_MD = run_experts(rows_MD, w_experts, dropless_dispatch(expert_M, e, cfg))
    else:
        y_MD = _dropless_exchange(rows_MD, expert_M, w_experts, e // ep, cfg, expert_axis)
    y_TD = combine(y_MD, r.weights_TK)
    return y_TD.reshape(b, t, d), statistics(r, kept_M, cfg, batch_axes)


def _capacity_exchange(rows_MD, w_experts, disp: Dispatch, local_e: int, axis):
    """Capacity buffer (E, R) -> all-to-all -> each device's experts see (E/ep, ep * R) -> back."""
    buf_ERD = scatter_rows(rows_MD, disp.dest_M, disp.n_rows).reshape(disp.num_experts, -1, rows_MD.shape[-1])
    mine = jax.lax.all_to_all(buf_ERD, axis, split_axis=0, concat_axis=1, tiled=True)
    local = Dispatch(None, mine.shape[0] * mine.shape[1], "capacity", num_experts=local_e)
    out = expert_ffn(mine.reshape(-1, mine.shape[-1]), w_experts, local).reshape(mine.shape)
    back_ERD = jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=0, tiled=True)
    return gather_rows(back_ERD.reshape(disp.n_rows, -1), disp.dest_M)


def _dropless_exchange(rows_MD, expert_M, w_experts, local_e: int, cfg: MoEConfig, axis):
    """Every pair goes to the device of its expert: a send buffer of M rows per peer cannot
    overflow. Received rows (from all peers) run through the local dropless pipeline."""
    m = expert_M.shape[0]
    ep = jax.lax.axis_size(axis)
    peer_M = expert_M // local_e
    rank_M, _ = rank_in_group(peer_M, ep)
    dest_M = peer_M * m + rank_M
    send_RD = scatter_rows(rows_MD, dest_M, ep * m)
    send_ids = jnp.full((ep * m,), local_e, jnp.int32).at[dest_M].set(expert_M % local_e, unique_indices=True)
    recv_RD = jax.lax.all_to_all(send_RD, axis, split_axis=0, concat_axis=0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids, axis, split_axis=0, concat_axis=0, tiled=True)
    out_RD = run_experts(recv_RD, w_experts, dropless_dispatch(recv_ids, local_e, cfg))
    back_RD = jax.lax.all_to_all(out_RD, axis, split_axis=0, concat_axis=0, tiled=True)
    return gather_rows(back_RD, dest_M)


def statistics(r: Routing, kept_M: jax.Array, cfg: MoEConfig, batch_axes) -> dict:
    """Whole-batch routing statistics and balancing losses (Switch load balance, ST-MoE z-loss)."""
    e, k = cfg.num_experts, cfg.top_k
    psum = (lambda x: jax.lax.psum(x, batch_axes)) if batch_axes else (lambda x: x)
    counts_E = jnp.zeros(e, F32).at[r.experts_TK.reshape(-1)].add(1.0)
    log_probs_TE = jnp.log(jnp.maximum(r.probs_TE, 1e-30))
    sums = psum(
        {
            "tokens": jnp.asarray(r.probs_TE.shape[0], F32),
            "counts_E": counts_E,
            "kept": jnp.sum(kept_M.astype(F32)),
            "probs_E": jnp.sum(r.probs_TE, axis=0),
            "entropy": -jnp.sum(r.probs_TE * log_probs_TE),
            "z": jnp.sum(jnp.square(jax.nn.logsumexp(r.logits_TE, axis=-1))),
        }
    )
    n = sums["tokens"]
    load_E = sums["counts_E"] / (n * k)
    lb_loss = e * jnp.sum(load_E * sums["probs_E"] / n)
    z_loss = sums["z"] / n
    return {
        "load": load_E,
        "dropped": 1.0 - sums["kept"] / (n * k),
        "entropy": sums["entropy"] / n,
        "lb_loss": lb_loss,
        "z_loss": z_loss,
        "aux_loss": cfg.load_balance_coef * lb_loss + cfg.z_loss_coef * z_loss,
    }


# ------------------------------------------------------------------------------------ module


def _param(rngs, shape, names, std):
    return nnx.Param(nnx.initializers.normal(stddev=std)(rngs.params(), shape, F32), out_sharding=names)


class MoE(nnx.Module):
    """Routed experts (+ shared experts): replaces the dense MLP of a MoE layer.

    __call__(x_BTD) -> (y_BTD, statistics). `deterministic` (set by `model.eval()`) selects the
    eval capacity factor.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        moe = cfg.moe
        d, e, f = cfg.d_model, moe.num_experts, cfg.expert_dim
        std, out_std = cfg.init_std, cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.moe = moe
        self.dtype = jnp.dtype(cfg.dtype)
        self.deterministic = False
        self.router = _param(rngs, (d, e), (axes.EMBED, None), moe.router_init_std)
        self.bias = RouterBias(jnp.zeros((e,), F32), out_sharding=(None,))
        self.w_gate = _param(rngs, (e, d, f), (axes.EXP, axes.EMBED, axes.MLP), std)
        self.w_up = _param(rngs, (e, d, f), (axes.EXP, axes.EMBED, axes.MLP), std)
        self.w_down = _param(rngs, (e, f, d), (axes.EXP, axes.MLP, axes.EMBED), out_std)
        fs = cfg.shared_dim
        if fs:
            self.shared_gate = _param(rngs, (d, fs), (axes.EMBED, axes.MLP), std)
            self.shared_up = _param(rngs, (d, fs), (axes.EMBED, axes.MLP), std)
            self.shared_down = _param(rngs, (fs, d), (axes.MLP, axes.EMBED), out_std)

    def experts(self) -> dict:
        dt = self.dtype
        return {
            "gate": self.w_gate[...].astype(dt),
            "up": self.w_up[...].astype(dt),
            "down": self.w_down[...].astype(dt),
        }

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict]:
        fn = partial(routed, cfg=self.moe, train=not self.deterministic)
        args = (x_BTD, self.router[...], self.bias[...], self.experts())
        batch_axes, expert_axis = _mesh_axes()
        if batch_axes is None:
            y_BTD, stats = fn(*args, expert_axis=None, batch_axes=None)
        else:
            spec = jax.sharding.PartitionSpec
            ex = spec(expert_axis)
            y_BTD, stats = jax.shard_map(
                partial(fn, expert_axis=expert_axis, batch_axes=batch_axes),
                in_specs=(spec(batch_axes), spec(), spec(), {"gate": ex, "up": ex, "down": ex}),
                out_specs=(spec(batch_axes), spec()),
            )(*args)
        y_BTD = y_BTD.astype(self.dtype)
        if hasattr(self, "shared_gate"):
            dt = self.dtype
            w = {
                "gate": self.shared_gate[...].astype(dt),
                "up": self.shared_up[...].astype(dt),
                "down": self.shared_down[...].astype(dt),
            }
            y_BTD = y_BTD + shared_ffn(x_BTD, w)
        return y_BTD, stats


def _mesh_axes():
    """(batch mesh axes, expert mesh axis) from the logical rules and context mesh; (None, None)
    when there is no mesh (one device, tests)."""
    resolved = axes.mesh_axes((axes.ACT_BATCH, axes.ACT_EXP))
    if resolved is None or jax.sharding.get_abstract_mesh().empty:
        return None, None
    batch, expert = resolved
    return axes.axis_group(batch), expert


def update_router_bias(bias_LE: jax.Array, load_LE: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 auxiliary-loss-free balancing: bias += rate * sign(mean load - load)."""
    return bias_LE + rate * jnp.sign(jnp.mean(load_LE, axis=-1, keepdims=True) - load_LE)


def call_with_stats(model: nnx.Module, *args, **kwargs):
    """(model(*args, **kwargs), the routing statistics it sowed, stacked (L, ...) over MoE
    layers); {} for a dense model."""
    out, sown = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    sown = nnx.to_pure_dict(sown)
    return out, (sown["moe_stats"][0] if "moe_stats" in sown else {})


def update_buffers(buffers: dict, load_LE: jax.Array, rate: float) -> dict:
    """Buffers after one step: every router bias (stacked (L, E) like the loads) moves toward
    balance. The model's only buffers are router biases."""
    return jax.tree.map(lambda bias_LE: update_router_bias(bias_LE, load_LE, rate), buffers)
