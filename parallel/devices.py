"""Peak FLOP/s per device: published figures for accelerators, a measured matmul peak on CPU."""

import time

import jax
import jax.numpy as jnp

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
    return published(PUBLISHED_PEAK, jax.devices()[0].device_kind) or measure_matmul_peak()
