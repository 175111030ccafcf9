"""Train state, its shardings, and its sharded initialization (one jit, explicit out_shardings).

Parameters are kept as pure nested dicts of arrays (what Orbax saves and export reads); the
model's graph definition rebinds them inside the step with `nnx.merge`. Model variables that
are not trained (`buffers`: the MoE router bias) live beside them, outside the optimizer.
"""

import dataclasses

import jax
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from podtrain.model import ModelConfig, Transformer
from podtrain.parallel import rules

BUFFERS = nnx.Not(nnx.Param)  # every other model variable (the MoE router bias)


@struct.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array  # raw key data; step s draws from fold_in(rng, s) (nothing random yet; resumes exactly)
    buffers: dict = struct.field(default_factory=dict)  # not trained: {} for dense models


@dataclasses.dataclass(frozen=True)
class Layout:
    """Everything the step needs to know about where the state lives."""

    graphdef: nnx.GraphDef
    mesh: Mesh
    state: TrainState  # of NamedShardings
    abstract: TrainState  # of ShapeDtypeStructs carrying those shardings

    @property
    def params(self):
        return self.state.params


def _build(cfg: ModelConfig, key) -> Transformer:
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(params=key))


def abstract_model(cfg: ModelConfig) -> tuple:
    """Abstract (graphdef, parameters, buffers) of the model; buffers are empty for a dense model."""
    return nnx.split(nnx.eval_shape(lambda: _build(cfg, jax.random.key(0))), nnx.Param, BUFFERS)


def layout(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> Layout:
    graphdef, abstract_vars, abstract_buffers = abstract_model(cfg)
    param_shardings = nnx.to_pure_dict(rules.state_shardings(abstract_vars, mesh))
    buffer_shardings = nnx.to_pure_dict(rules.state_shardings(abstract_buffers, mesh))
    abstract_params = nnx.to_pure_dict(abstract_vars)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = rules.opt_state_shardings(tx, abstract_opt, param_shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(param_shardings, opt_shardings, replicated, replicated, buffer_shardings)
    shapes = TrainState(
        abstract_params,
        abstract_opt,
        jax.ShapeDtypeStruct((), "int32"),
        jax.eval_shape(rng_key, 0),
        nnx.to_pure_dict(abstract_buffers),
    )
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return Layout(graphdef, mesh, shardings, abstract)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, lay: Layout, seed: int) -> TrainState:
    def init(key):
        _, params, buffers = nnx.split(_build(cfg, key), nnx.Param, BUFFERS)
        params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
        return TrainState(params, tx.init(params), jax.numpy.zeros((), "int32"), rng_key(seed), buffers)

    return jax.jit(init, out_shardings=lay.state)(jax.random.key(seed))


def rng_key(seed) -> jax.Array:
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))  # a stream apart from init's


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
