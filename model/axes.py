"""Logical axis names for parameters and activations, and the activation constraint hook.

`model/` only names axes; `parallel/rules.py` maps the names to mesh axes. The mapping is
installed with `flax.nnx.logical_axis_rules(...)` around tracing; `mesh_axes` is the model's one
reading of it. Without rules `constrain` is a no-op, so the model runs unchanged on one device and
in tests.
"""

import math

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec as P

# Parameter axes.
LAYERS = "layers"
VOCAB = "vocab"
EMBED = "embed"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
NORM = "norm"
EXP = "exp"  # experts

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
ACT_EXP = "act_exp"


# The mesh axes of one dimension as the rules write them: one mesh axis, a tuple of them, or None.
MeshAxes = str | tuple[str, ...] | None


def mesh_axes(names: tuple[str | None, ...]) -> tuple[MeshAxes, ...] | None:
    """The mesh axes each logical name maps to under the installed rules; None without rules.

    Resolved by `flax.core.spmd.from_sharding_rules`, as NNX resolves a Variable's `out_sharding`
    under the same rules: None stays None, a name the rules do not list passes through unchanged.
    """
    rules = spmd.get_logical_axis_rules()
    if not rules:
        return None
    return tuple(spmd.from_sharding_rules(tuple(names), rules))


def axis_group(axes: MeshAxes) -> tuple[str, ...]:
    """`axes` as a tuple of mesh axis names: None -> (), 'tensor' -> ('tensor',)."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin the sharding of activation `x` by logical axis names (no-op without rules).

    A dimension whose mesh degree does not divide it (2 kv heads on tensor=4, a vocab of 65) is
    left to the compiler (unconstrained) rather than padded.
    """
    resolved = mesh_axes(names)
    if resolved is None:
        return x
    mesh_shape = jax.sharding.get_abstract_mesh().shape
    spec = []
    for axes, dim in zip(resolved, x.shape):
        size = math.prod(mesh_shape.get(a, 1) for a in axis_group(axes))
        spec.append(axes if dim % size == 0 else P.UNCONSTRAINED)
    return jax.lax.with_sharding_constraint(x, P(*spec))
