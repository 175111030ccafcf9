"""A Config checked against its mesh before anything compiles: one-line ConfigErrors.

parallel/ checks the mesh on its own (degrees against devices); the checks here need to know
the model and the batch, which parallel/ does not.
"""

import jax
from jax.sharding import Mesh

from podtrain.parallel import mesh as meshes
from podtrain.parallel import rules
from podtrain.train.config import Config, ConfigError


def build_mesh(cfg: Config, devices=None) -> Mesh:
    """The run's mesh, after every check that the config fits it."""
    available = len(devices) if devices is not None else jax.device_count()
    if cfg.mesh.devices > available:
        raise ConfigError(
            f"mesh.devices={cfg.mesh.devices} is more than the {available} devices here; "
            f"set it to at most {available} (0: all)"
        )
    check_degrees(cfg)
    try:
        mesh = meshes.build_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(cfg, mesh)
    return mesh


def check_degrees(cfg: Config) -> None:
    """The checks that the configured degrees allow before any device is seen (a -1 degree waits
    for the mesh): `submit` runs them on the submitting machine, `build_mesh` before building."""
    if cfg.mesh.expert != -1:
        check_expert(cfg, cfg.mesh.expert * cfg.mesh.dcn_expert)


def check(cfg: Config, mesh: Mesh) -> None:
    check_tensor(cfg, mesh.shape["tensor"])
    check_expert(cfg, mesh.shape["expert"])
    check_batch(cfg, rules.data_parallel_size(mesh))


def check_tensor(cfg: Config, tensor: int) -> None:
    """Tensor parallelism splits query heads and the MLP; kv heads split when `tensor` divides them.

    Fewer kv heads than `tensor` (GQA) is fine: the kv projections are then kept whole on every
    tensor-parallel device.
    """
    m = cfg.model
    for key, value in (("num_heads", m.num_heads), ("mlp_dim", m.mlp_dim)):
        if value % tensor:
            raise ConfigError(
                f"model.{key}={value} is not divisible by the tensor-parallel degree {tensor} "
                f"(mesh.tensor x mesh.dcn_tensor); choose a tensor degree that divides it"
            )


def check_expert(cfg: Config, expert: int) -> None:
    """Experts are sharded over the `expert` mesh axis (ICI x DCN): its degree must divide E."""
    experts = cfg.model.moe.num_experts
    if expert > 1 and experts == 0:
        raise ConfigError(
            f"mesh.expert x mesh.dcn_expert = {expert} but the model is dense (no experts); "
            f"set mesh.expert=1 and mesh.dcn_expert=1, or give the model experts"
        )
    if experts and experts % expert:
        raise ConfigError(
            f"the expert-parallel degree {expert} (mesh.expert x mesh.dcn_expert) does not divide "
            f"the {experts} experts of model.moe.num_experts={experts}; choose a degree that divides {experts}"
        )


def check_batch(cfg: Config, data_parallel: int) -> None:
    t = cfg.train
    per_micro = t.batch_size // t.grad_accum_steps
    if per_micro % data_parallel:
        raise ConfigError(
            f"train.batch_size={t.batch_size} / train.grad_accum_steps={t.grad_accum_steps} = {per_micro} "
            f"sequences per microbatch is not divisible by the data-parallel degree {data_parallel} "
            f"(data x fsdp x expert, ICI x DCN); make the batch a multiple of {data_parallel * t.grad_accum_steps}"
        )
    if t.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by the process count {jax.process_count()}"
        )
