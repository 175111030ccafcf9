"""Peak FLOP/s per device: published figures for accelerators, a measured matmul peak on CPU."""

import os
import time

import jax
import jax.numpy as jnp

from podtrain.parallel import distributed
from podtrain.parallel.config import MeshConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' published specifications.
PUBLISHED_PEAK = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # what a v5p chip reports as its device_kind
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

# HBM capacity (bytes) and bandwidth (bytes/s) per chip, from the same specifications.
PUBLISHED_HBM = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5e": 16 * 2**30,
    "TPU v5p": 95 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
    "TPU v6e": 32 * 2**30,
    "NVIDIA H100": 80 * 2**30,  # "80GB" is 80 GiB of HBM3
    "NVIDIA H200": 141e9,
    "NVIDIA A100": 80e9,
}
PUBLISHED_HBM_BANDWIDTH = {
    "TPU v4": 1228e9,
    "TPU v5 lite": 819e9,
    "TPU v5e": 819e9,
    "TPU v5p": 2765e9,
    "TPU v5": 2765e9,
    "TPU v6 lite": 1640e9,
    "TPU v6e": 1640e9,
    "NVIDIA H100": 3350e9,
    "NVIDIA H200": 4800e9,
    "NVIDIA A100": 2039e9,
}


def published(table: dict[str, float], device_kind: str) -> float | None:
    """The entry of `table` for a device kind (the longest matching name), or None."""
    names = [name for name in table if device_kind.startswith(name)]
    return table[max(names, key=len)] if names else None


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, seconds: float = 0.5) -> float:
    """Best FLOP/s of an n x n matmul on the default device, over about `seconds`."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device() -> float:
    """The published peak of an accelerator; on CPU the measured matmul peak of the host (all its
    cores: XLA threads one matmul over them) shared by its CPU devices (one per core)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_matmul_peak() / jax.local_device_count()
    return published(PUBLISHED_PEAK, device.device_kind) or measure_matmul_peak()


def _cpu_count_set_by_user(environ) -> bool:
    return "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices > 0


def devices_dividing(batch_size: int | None, cores: int) -> int:
    """The most devices, at most `cores`, that split batch_size evenly (None: every core)."""
    return max(d for d in range(1, cores + 1) if batch_size is None or batch_size % d == 0)


# From this d_model on, one CPU device threading each op over the cores beats one device per
# core (bench/train_throughput.py on the 2-core dev host: the layouts tie at d_model 256; one
# device is 3-14% faster at 512 and 1024, where the matmuls dominate and one device per core adds
# a per-device optimizer update and a gradient all-reduce without adding matmul throughput).
ONE_DEVICE_FROM_D_MODEL = 512


def use_cpu_cores(batch_size: int | None = None, d_model: int | None = None, environ=os.environ) -> int:
    """On the CPU backend, make each core a JAX device, so a mesh's data axis spans the cores.

    XLA:CPU runs one op at a time per device and most ops (every elementwise fusion, the small
    matmuls) on one thread: with one device a 2-core host keeps 1.2 cores busy at the nanoGPT
    shape. One device per core runs the batch data-parallel with each device single-threaded
    (train.step compiles for that), the same program the sharded path runs on a pod. Uses the
    largest core count dividing batch_size (None: every core). A model of d_model >=
    ONE_DEVICE_FROM_D_MODEL gets one device instead (pass d_model only where the mesh config asks
    for no parallelism of its own: use_cpu_cores_for). A count the user set (XLA_FLAGS
    --xla_force_host_platform_device_count, jax_num_cpu_devices, a launcher) is left alone.
    Call before anything initializes a JAX backend: once one runs, its device count stays (JAX's
    config validator rejects a new jax_num_cpu_devices with a RuntimeError) and this does nothing.
    Returns the CPU device count it asked for (0: left alone). Accelerator backends are
    unaffected: the CPU client is not the default there.
    """
    if _cpu_count_set_by_user(environ) or environ.get(distributed.ENV_COORDINATOR):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = cpu_device_count(batch_size, cores, d_model)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # a backend is running: its device count stays
        return 0
    return n


def use_cpu_cores_for(mesh: MeshConfig, batch_size: int, d_model: int, environ=os.environ) -> int:
    """use_cpu_cores for a run of `batch_size` rows per step (per micro-batch) on `mesh`.

    A mesh config that asks for a device count or a parallelism degree of its own gets one device
    per core whatever the model; otherwise the model's d_model decides (one device from
    ONE_DEVICE_FROM_D_MODEL). pretrain and finetune call it first thing, so a run from Python
    lays out the CPU like `podtrain pretrain`.
    """
    own = mesh.devices or any(d not in (-1, 1) for d in mesh.ici) or any(d != 1 for d in mesh.dcn)
    return use_cpu_cores(batch_size, None if own else d_model, environ)


def cpu_device_count(batch_size: int | None, cores: int, d_model: int | None = None) -> int:
    """The CPU device count use_cpu_cores picks on a host of `cores` cores."""
    if d_model is not None and d_model >= ONE_DEVICE_FROM_D_MODEL:
        return 1
    return devices_dividing(batch_size, cores)


def compiler_options(mesh) -> dict | None:
    """XLA options for steps compiled for `mesh`: with several CPU devices in this process each
    runs its ops single-threaded (the devices, one per core, are the parallelism; intra-op threads
    on top of them oversubscribe the cores: 38.3 -> 33.6 ms per nanoGPT step on 2 cores)."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if local and local[0].platform == "cpu" and len(local) > 1:
        return {"xla_cpu_multi_thread_eigen": False}
    return None
