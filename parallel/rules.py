"""The one logical-axis table, and the shardings of parameters, optimizer state and batches.

Parameters and activations map separately. Parameters: tensor and expert parallelism come from
the table, then FSDP shards the largest remaining dimension of every weight that the `fsdp`
degree divides. Activations: the batch is split over every data-parallel axis.
"""

import math

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp", "expert")  # the batch is split over all of these

Axes = str | tuple[str, ...] | None

# logical name: (mesh axes of parameters, mesh axes of activations). A name used only by one of
# the two maps to None in the other. A mapping whose degree does not divide a dimension is
# dropped for that array (e.g. 2 kv heads with tensor=4: kv weights stay whole on `tensor`).
RULES: dict[str, tuple[Axes, Axes]] = {
    # parameters; FSDP is not in the table: it takes the largest dimension left unsharded here
    "layers": (None, None),  # scanned over: never sharded
    "vocab": ("tensor", None),
    "embed": (None, None),
    "q_heads": ("tensor", None),
    "kv_heads": ("tensor", None),
    "head_dim": (None, None),
    "mlp": ("tensor", None),
    "norm": (None, None),
    "exp": ("expert", None),
    # activations at layer boundaries (model.axes.constrain)
    "act_batch": (None, DATA_AXES),
    "act_length": (None, None),
    "act_embed": (None, None),  # the residual stream is replicated over `tensor`
    "act_heads": (None, "tensor"),
    "act_kv_heads": (None, "tensor"),
    "act_mlp": (None, "tensor"),
    "act_vocab": (None, "tensor"),
    "act_exp": (None, "expert"),
}


def activation_rules() -> tuple[tuple[str, Axes], ...]:
    """Rules for `flax.nnx.logical_axis_rules`, read by `model.axes.mesh_axes`."""
    return tuple((name, act) for name, (_, act) in RULES.items() if name.startswith("act_"))


def _group(axes: Axes, mesh) -> tuple[tuple[str, ...], int]:
    """A table entry's mesh axes as a tuple, and their degree on `mesh` (the product of sizes)."""
    group = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return group, math.prod(mesh.shape[a] for a in group)


def param_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
    """PartitionSpec of one parameter from its logical names and shape (`mesh` may be abstract)."""
    spec, used = [], set()
    for name, dim in zip(names, shape):
        axes = RULES[name][0] if name else None
        group, size = _group(axes, mesh)
        fits = size > 1 and dim % size == 0 and not used & set(group)
        spec.append(axes if fits else None)
        used |= set(group) if fits else set()
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and "fsdp" not in used:
        free = [i for i, (n, d) in enumerate(zip(names, shape)) if spec[i] is None and n != "layers" and d % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"  # ties: the first such dimension
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(abstract_state, mesh):
    """PartitionSpecs for an nnx.State of Variables carrying `out_sharding` logical names."""

    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return var.replace(param_spec(tuple(names), var.shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an nnx.State of Variables carrying `out_sharding` logical names."""
    specs = param_specs(abstract_state, mesh)
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())), specs, is_leaf=_is_variable)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings, mesh: Mesh):
    """Optimizer moments shard like their parameters; everything else is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of (B, T) batch arrays: B over every data-parallel axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return _group(DATA_AXES, mesh)[1]


def process_batch_slice(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * B/count, (index + 1) * B/count) of a batch.

    Read from the sharding, so it holds for any mesh: with `data` across processes each process
    feeds its own block; with `tensor` across processes several processes feed the same rows.
    """
    rows = sorted(
        {
            (s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
            for s in sharding.addressable_devices_indices_map((global_batch,)).values()
        }
    )
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    size = stop - start
    if covered != size or start % size or global_batch % size:
        raise ValueError(f"the batch rows of process {jax.process_index()} are not one aligned block: {rows}")
    return start // size, global_batch // size
