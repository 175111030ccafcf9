"""Accelerator names to compile-only JAX devices, for `plan`.

TPU slices: `v5p-256` (what gcloud calls an accelerator type) or `v5p:4x4x8` (chips per axis, what
libtpu calls a topology) to chips, hosts, and the names gcloud, GKE and libtpu use. v4 and v5p
names count TensorCores (two per chip, one JAX device per chip in megacore mode); v5e and v6e
names count chips. Hosts have four chips in multi-host slices; single-host v5e/v6e slices up to
eight chips are one host.

GPU nodes: `h100-8` (one node of 8 H100 SXM GPUs), `h100-32` (four such nodes). JAX's CUDA
plugin (the jax-cuda12-plugin wheel, no GPU or CUDA driver needed) compiles for a GPU described
by an XLA GpuTargetConfigProto passed as the topology's `target_config`; the description below
is written from NVIDIA's published H100 SXM5 figures.
"""

import dataclasses
import importlib.util
import math
import os
import re

from podtrain.parallel.config import AXES
from podtrain.train import config as configs
from podtrain.train.config import Config, ConfigError

# generation: (cores per chip in the slice name, libtpu name, gcloud prefix, GKE accelerator label)
GENERATIONS = {
    "v4": (2, "v4", "v4", "tpu-v4-podslice"),
    "v5p": (2, "v5p", "v5p", "tpu-v5p-slice"),
    "v5e": (1, "v5e", "v5litepod", "tpu-v5-lite-podslice"),
    "v6e": (1, "v6e", "v6e", "tpu-v6e-slice"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# Chips -> shape of the standard slice shapes (3D torus for v4/v5p, 2D for v5e/v6e).
SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
CHIPS_PER_HOST = 4


@dataclasses.dataclass(frozen=True)
class Slice:
    generation: str  # v4 | v5p | v5e | v6e
    shape: tuple[int, ...]  # chips per axis

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hosts(self) -> int:
        if len(self.shape) == 2 and self.chips <= 8:
            return 1
        return max(1, self.chips // CHIPS_PER_HOST)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        if self.hosts == 1:
            return (*self.shape, 1)[:3] if len(self.shape) == 2 else self.shape
        return (2, 2, 1)

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def libtpu_name(self) -> str:
        return f"{GENERATIONS[self.generation][1]}:{self.shape_str}"

    @property
    def accelerator_type(self) -> str:
        """The gcloud --accelerator-type, e.g. v5p-256 or v5litepod-16."""
        cores, _, prefix, _ = GENERATIONS[self.generation]
        return f"{prefix}-{self.chips * cores}"

    @property
    def gke_accelerator(self) -> str:
        return GENERATIONS[self.generation][3]

    @property
    def describe(self) -> str:
        return f"{self.accelerator_type} ({self.libtpu_name})"


# NVIDIA H100 SXM5 80GB (compute capability 9.0): 132 SMs at up to 1.98 GHz, 128 FP32 lanes and
# 64K registers per SM, 228 KiB shared memory per SM (227 KiB per block opted in, 48 KiB by
# default), 50 MiB L2, 80 GB HBM3 at 3.35 TB/s (81559 MiB usable). dnn_version_info: the cuDNN
# major the jax 0.10 CUDA 12 wheels are built against (it gates cuDNN fusions).
H100_SXM = """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  core_count: 132
  fpus_per_core: 128
  clock_rate_ghz: 1.98
  threads_per_warp: 32
  threads_per_block_limit: 1024
  threads_per_core_limit: 2048
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  l2_cache_size: 52428800
  device_memory_size: 85520809984
  memory_bandwidth: 3350000000000
  name: "NVIDIA H100 80GB HBM3"
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGETS = {"h100": H100_SXM}
GPUS_PER_NODE = 8


@dataclasses.dataclass(frozen=True)
class GpuNodes:
    """`nodes` hosts of `per_node` GPUs of one model (a key of GPU_TARGETS)."""

    model: str
    nodes: int
    per_node: int

    @property
    def chips(self) -> int:
        return self.nodes * self.per_node

    @property
    def accelerator_type(self) -> str:
        return f"{self.model}-{self.chips}"

    @property
    def describe(self) -> str:
        return f"{self.accelerator_type} ({self.nodes} node{'s' * (self.nodes > 1)} x {self.per_node} GPUs)"


def parse_target(name: str, key: str = "--topology") -> "Slice | GpuNodes":
    """A TPU slice (see `parse`) or GPU nodes: `h100-N`, N GPUs in nodes of 8 (or one node of 1, 2, 4)."""
    m = re.fullmatch(r"([a-z]\d+)-(\d+)", name.strip().lower())
    if not m or m.group(1) not in GPU_TARGETS:
        try:
            return parse(name, key)
        except ConfigError as e:
            gpus = ", ".join(f"{g}-8, {g}-16" for g in GPU_TARGETS)
            raise ConfigError(f"{e}; or GPU nodes: {gpus}") from None
    count = int(m.group(2))
    if count in (1, 2, 4, GPUS_PER_NODE):
        return GpuNodes(m.group(1), 1, count)
    if count % GPUS_PER_NODE or count == 0:
        raise ConfigError(
            f"{key}={name!r}: GPUs come in nodes of {GPUS_PER_NODE}: use {m.group(1)}-1, -2, -4, -8 or a multiple "
            f"of 8 (e.g. {m.group(1)}-16 for two nodes)"
        )
    return GpuNodes(m.group(1), count // GPUS_PER_NODE, GPUS_PER_NODE)


def has_cuda_plugin() -> bool:
    """Whether JAX's CUDA plugin (the jax-cuda12-plugin wheel) is installed."""
    if importlib.util.find_spec("jax_plugins") is None:  # the plugins' namespace package
        return False
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def gpu_devices(nodes: GpuNodes):
    """Compile-only JAX devices of `nodes` (needs JAX's CUDA plugin wheel; no GPU, no driver)."""
    if not has_cuda_plugin():
        raise ConfigError(
            f"--topology={nodes.accelerator_type}: plan compiles for GPUs with JAX's CUDA plugin, which is not "
            f"installed: pip install 'podtrain[gpu-plan]' (no GPU or CUDA driver needed)"
        )
    import jax
    from jax.experimental import topologies

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the host stays the default backend: no GPU here
    topo = f"1x{nodes.nodes}x{nodes.per_node}"  # partitions x hosts per partition x devices per host
    return topologies.get_topology_desc("", "cuda", target_config=GPU_TARGETS[nodes.model], topology=topo).devices


def parse(name: str, key: str = "--topology") -> Slice:
    """`v5p-256`, `v5litepod-16`, `v6e-64` or `v5p:4x4x8`; ConfigError naming the valid forms."""
    m = re.fullmatch(r"(v\d+[a-z]*)([-:])([\dx]+)", name.strip().lower())
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in GENERATIONS:
        raise ConfigError(
            f"{key}={name!r} is not a TPU slice: use e.g. v5p-256, v4-128, v5litepod-16, v6e-64 or v5p:4x4x8 "
            f"(generations: {', '.join(GENERATIONS)})"
        )
    dims = 3 if gen in ("v4", "v5p") else 2
    shapes = SHAPES_3D if dims == 3 else SHAPES_2D
    if m.group(2) == ":":
        shape = tuple(int(d) for d in m.group(3).split("x") if d)
        if len(shape) != dims or min(shape) < 1:
            raise ConfigError(f"{key}={name!r}: a {gen} topology has {dims} axes, e.g. {gen}:{'x'.join(['2'] * dims)}")
        return Slice(gen, shape)
    cores = GENERATIONS[gen][0]
    count = int(m.group(3)) if m.group(3).isdigit() else -1
    if count % cores or count // cores not in shapes:
        valid = ", ".join(f"{GENERATIONS[gen][2]}-{c * cores}" for c in shapes)
        raise ConfigError(f"{key}={name!r} is not a standard {gen} slice: use one of {valid}, or {gen}:AxBxC")
    return Slice(gen, shapes[count // cores])


def devices(sl: "Slice | GpuNodes", num_slices: int = 1):
    """Compile-only JAX devices of `num_slices` such slices (needs the libtpu wheel, no TPU), or of
    GPU nodes (one group: nodes are not slices)."""
    if isinstance(sl, GpuNodes):
        if num_slices != 1:
            raise ConfigError(
                f"--num-slices={num_slices}: GPU nodes are one group; name them all instead, e.g. "
                f"--topology={sl.model}-{sl.chips * num_slices}"
            )
        return gpu_devices(sl)
    # No TPU is attached: let this process load libtpu even if another process holds its lock,
    # keep the default backend on the host CPU, and tell libtpu not to look for TPU workers (it
    # would query a metadata server and log errors about the missing ones).
    for key, value in (
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_ACCELERATOR_TYPE", sl.accelerator_type),
    ):
        os.environ.setdefault(key, value)
    import jax
    from jax.experimental import topologies

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError("plan needs the libtpu wheel to compile for TPUs: pip install 'podtrain[tpu]'") from None
    kwargs = {"chips_per_host_bounds": sl.chips_per_host_bounds}
    if GENERATIONS[sl.generation][0] == 2:
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as on Cloud TPU
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    return topologies.get_topology_desc(sl.libtpu_name, "tpu", **kwargs).devices


def with_slices(cfg: Config, num_slices: int) -> Config:
    """`cfg` for `num_slices` slices: unless the config sets DCN degrees, the slices are data parallel."""
    dcn = math.prod(cfg.mesh.dcn)
    if num_slices > 1 and dcn == 1:
        return configs.replace(cfg, mesh={"dcn_data": num_slices})
    if dcn != num_slices:
        raise ConfigError(
            f"mesh DCN degrees {dict(zip(AXES, cfg.mesh.dcn))} multiply to {dcn}, but there are {num_slices} slices"
        )
    return cfg
