"""The train and eval steps: one `jax.jit` each, with explicit in/out shardings from parallel/."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from podtrain.model import moe as moe_lib
from podtrain.model.config import ModelConfig
from podtrain.parallel import devices, rules
from podtrain.train.config import TrainConfig
from podtrain.train.state import Layout, TrainState

Batch = dict[str, jax.Array]  # 'inputs', 'targets' (B, T) int32; optional 'weights', 'segment_ids', 'positions'


def _token_losses(logits_BTV, targets_BT, weights_BT=None, z_loss: float = 0.0):
    """(per-token cross-entropy + z_loss * log Z^2, per-token weight), in float32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    if z_loss:
        nll_BT = nll_BT + z_loss * jnp.square(log_z_BT)
    w_BT = jnp.ones_like(nll_BT) if weights_BT is None else weights_BT.astype(jnp.float32)
    return nll_BT, w_BT


def lm_loss(logits_BTV, targets_BT, weights_BT=None, z_loss: float = 0.0):
    """(mean weighted cross-entropy + z_loss * mean log Z^2, total weight), in float32."""
    nll_BT, w_BT = _token_losses(logits_BTV, targets_BT, weights_BT, z_loss)
    total = jnp.sum(w_BT)
    return jnp.sum(nll_BT * w_BT) / jnp.maximum(total, 1.0), total


def _loss_and_weight_sums(logits_BTV, targets_BT, weights_BT=None):
    """(sum of weighted token losses, sum of weights) as one reduction: one all-reduce across
    devices. Two independent all-reduces in one program can deadlock XLA:CPU with several devices
    in a process (each blocks a worker of the shared thread pool waiting for the other devices)."""
    nll_BT, w_BT = _token_losses(logits_BTV, targets_BT, weights_BT)
    sums = jnp.sum(jnp.stack([nll_BT * w_BT, w_BT], axis=-1), axis=(0, 1))
    return sums[0], sums[1]


def apply_with_stats(graphdef, params, batch: Batch, buffers=None, train: bool = True):
    """(logits, MoE routing statistics ({} for a dense model)); buffers: the MoE router bias;
    train=False selects the eval capacity factor."""
    model = nnx.merge(graphdef, params, buffers or {})
    if not train:
        model.eval()
    (logits_BTV, _), stats = moe_lib.call_with_stats(
        model, batch["inputs"], positions_BT=batch.get("positions"), segment_ids_BT=batch.get("segment_ids")
    )
    return logits_BTV, stats


def _aux_loss(stats: dict):
    """The MoE balancing losses (load balance, router z-loss) of all layers; 0 for dense."""
    return jnp.sum(stats["aux_loss"]) if stats else 0.0


def _forward_loss(graphdef, params, buffers, batch: Batch, z_loss: float):
    """(loss + MoE auxiliary losses, (loss, MoE statistics))."""
    logits_BTV, stats = apply_with_stats(graphdef, params, batch, buffers)
    loss, _ = lm_loss(logits_BTV, batch["targets"], batch.get("weights"), z_loss)
    return loss + _aux_loss(stats), (loss, stats)


def _weighted_sum_loss(graphdef, params, buffers, batch: Batch, z_loss: float):
    """((loss + MoE aux losses) x total weight, (sum of weighted token losses, total weight, MoE
    statistics)): microbatches add these up exactly; aux losses count in proportion to weight."""
    logits_BTV, stats = apply_with_stats(graphdef, params, batch, buffers)
    loss, total = lm_loss(logits_BTV, batch["targets"], batch.get("weights"), z_loss)
    return (loss + _aux_loss(stats)) * total, (loss * total, total, stats)


def _microbatches(batch: Batch, k: int) -> Batch:
    """(B, ...) -> (k, B/k, ...); microbatch i takes rows i, i+k, ... so every device keeps its rows."""

    def split(x):
        micro = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(micro, PartitionSpec(None, rules.DATA_AXES))

    return jax.tree.map(split, batch)


def _grads(graphdef, params, buffers, batch: Batch, cfg: TrainConfig, to_model=lambda p: p):
    """((mean loss, MoE statistics), gradients) over the batch, accumulated over grad_accum_steps
    microbatches.

    Microbatches sum token losses and weights, and the sum is divided once by the total weight,
    so k microbatches give the full batch's loss and gradients (up to float rounding).
    """
    k = cfg.grad_accum_steps
    if k == 1:
        loss_fn = lambda p: _forward_loss(graphdef, to_model(p), buffers, batch, cfg.z_loss)  # noqa: E731
        (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return out, grads
    grad_fn = jax.value_and_grad(
        lambda p, b: _weighted_sum_loss(graphdef, to_model(p), buffers, b, cfg.z_loss), has_aux=True
    )

    def accumulate(carry, mb):
        (_, (loss_sum, total, stats)), grads = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, (loss_sum, total, grads)), stats

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, total, grads), stats = jax.lax.scan(accumulate, zero, _microbatches(batch, k))
    total = jnp.maximum(total, 1.0)
    stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), stats)
    return (loss_sum / total, stats), jax.tree.map(lambda g: g / total, grads)


def make_train_step(
    lay: Layout, tx: optax.GradientTransformation, cfg: TrainConfig, model: ModelConfig, materialize=None
):
    """The jitted step. With materialize(train, frozen) -> model params (fine-tuning: train/finetune.py),
    state.params is {'train', 'frozen'}: only 'train' is differentiated and updated; 'frozen' passes through.
    With MoE the router biases (state.buffers) move by model.moe.bias_update_rate, outside the gradient."""

    def step(state: TrainState, batch: Batch):
        train, frozen = (state.params, None) if materialize is None else (state.params["train"], state.params["frozen"])
        to_model = (lambda p: p) if materialize is None else (lambda p: materialize(p, frozen))
        with nnx.logical_axis_rules(rules.activation_rules()):
            (loss, stats), grads = _grads(lay.graphdef, train, state.buffers, batch, cfg, to_model)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # else skip the update (the loop counts these)

        def update(_):
            updates, opt_state = tx.update(grads, state.opt_state, train)
            return optax.apply_updates(train, updates), opt_state

        # a cond, not a select between new and old: the select kept the old optimizer state alive
        # next to the new, and XLA copied every donated moment buffer each step
        new, opt_state = jax.lax.cond(finite, update, lambda _: (train, state.opt_state), None)
        params = new if materialize is None else {"train": new, "frozen": frozen}
        metrics = {"train_loss": loss, "grad_norm": grad_norm, "skipped": ~finite}
        buffers = state.buffers
        if stats:  # MoE: balancing outside the gradient, and what to log
            if model.moe.bias_update_rate:
                new = moe_lib.update_buffers(buffers, stats["load"], model.moe.bias_update_rate)
                buffers = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, buffers)
            metrics["moe"] = stats | {"bias": jax.tree.leaves(state.buffers)[0]}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1, buffers=buffers), metrics

    batch_sharding = rules.batch_sharding(lay.mesh)
    jitted = jax.jit(
        step,
        in_shardings=(lay.state, batch_sharding),
        out_shardings=(lay.state, None),
        donate_argnums=0,
        compiler_options=devices.compiler_options(lay.mesh),
    )
    return under_mesh(jitted, lay.mesh)


def make_eval_step(lay: Layout, materialize=None):
    """eval_step(params, batch, buffers=None) -> (summed loss, total weight); buffers: MoE router bias."""

    def step(params, batch: Batch, buffers):
        if materialize is not None:
            params = materialize(params["train"], params["frozen"])
        with nnx.logical_axis_rules(rules.activation_rules()):
            logits_BTV, _ = apply_with_stats(lay.graphdef, params, batch, buffers, train=False)
        return _loss_and_weight_sums(logits_BTV, batch["targets"], batch.get("weights"))

    in_shardings = (lay.params, rules.batch_sharding(lay.mesh), lay.state.buffers)
    jitted = jax.jit(step, in_shardings=in_shardings, compiler_options=devices.compiler_options(lay.mesh))
    jitted = under_mesh(jitted, lay.mesh)

    def call(params, batch, buffers=None):
        return jitted(params, batch, {} if buffers is None else buffers)

    call.lower = lambda params, batch, buffers=None: jitted.lower(params, batch, {} if buffers is None else buffers)
    return call


def under_mesh(jitted, mesh):
    """Call (and so trace) `jitted` with `mesh` as the context mesh of activation constraints."""

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    call.lower = lambda *args: _lower(jitted, mesh, *args)
    return call


def _lower(jitted, mesh, *args):
    with jax.set_mesh(mesh):
        return jitted.lower(*args)
