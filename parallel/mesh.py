"""Build the device mesh from MeshConfig (hybrid ICI x DCN where there are several slices)."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from podtrain.parallel.config import AXES, MeshConfig


def _degrees(prefix: str, values) -> str:
    return " x ".join(f"mesh.{prefix}{a}={v}" for a, v in zip(AXES, values) if v != 1) or "all degrees 1"


def resolve_degrees(cfg: MeshConfig, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici, dcn) degrees per axis with the -1 filled; ValueError naming the fix if they do not fit.

    The DCN degrees split the devices into slices (or processes); the ICI degrees split each
    slice, and one ICI degree of -1 takes whatever the others leave.
    """
    dcn = cfg.dcn
    per_slice, rem = divmod(num_devices, math.prod(dcn))
    if rem or per_slice == 0:
        raise ValueError(
            f"mesh: {_degrees('dcn_', dcn)} makes {math.prod(dcn)} slices, which does not divide the "
            f"{num_devices} devices; choose DCN degrees whose product divides {num_devices}"
        )
    ici = list(cfg.ici)
    if -1 in ici:
        known = math.prod(d for d in ici if d != -1)
        if per_slice % known:
            raise ValueError(
                f"mesh: {_degrees('', cfg.ici)} leaves no whole degree for the -1 axis: {known} does not "
                f"divide the {per_slice} devices per slice; choose degrees whose product divides {per_slice}"
            )
        ici[ici.index(-1)] = per_slice // known
    if math.prod(ici) != per_slice:
        raise ValueError(
            f"mesh: {_degrees('', ici)} multiplies to {math.prod(ici)}, but there are {per_slice} devices "
            f"per slice ({num_devices} in all); make the product {per_slice}, or set one degree to -1 to fill"
        )
    return tuple(ici), dcn


def build_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    if devices is None:
        devices = jax.devices()[: cfg.devices] if cfg.devices else jax.devices()
    ici, dcn = resolve_degrees(cfg, len(devices))
    shape = tuple(i * d for i, d in zip(ici, dcn))
    if math.prod(dcn) == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    elif jax.process_count() > 1 or getattr(devices[0], "slice_index", None) is not None:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=jax.process_count() > 1, allow_split_physical_axes=True
        )
    else:
        # One process with no slices (CPU fake devices): consecutive device blocks play slices.
        grid = _emulated_hybrid(ici, dcn, devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _emulated_hybrid(ici, dcn, devices) -> np.ndarray:
    n = len(ici)
    arr = np.asarray(devices).reshape(*dcn, *ici)
    order = [x for pair in zip(range(n), range(n, 2 * n)) for x in pair]  # interleave dcn_i, ici_i
    return arr.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])
