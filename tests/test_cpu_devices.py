"""On a CPU host `podtrain pretrain` makes each core a JAX device (parallel/devices.py); steps
compiled for several CPU devices in one process run their ops single-threaded."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from parallel import devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = len(os.sched_getaffinity(0))


def fresh_process(code: str, **env) -> str:
    """stdout of `code` in a new interpreter (the device count is fixed once a backend starts)."""
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PODTRAIN_COORDINATOR")}
    result = subprocess.run(
        [sys.executable, "-c", code], env={**base, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, **env},
        capture_output=True, text=True, timeout=120, check=True,
    )
    return result.stdout.split()


PROBE = "from parallel import devices; n = devices.use_cpu_cores({}); import jax; print(n, jax.device_count())"


@pytest.mark.parametrize("batch", [12, 7, None])
def test_one_device_per_core_dividing_the_batch(batch):
    want = max(d for d in range(1, CORES + 1) if batch is None or batch % d == 0)
    assert fresh_process(PROBE.format(batch)) == [str(want), str(want)]


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},  # the user's count
    {"PODTRAIN_COORDINATOR": "127.0.0.1:1"},  # a launcher's job sets its own count
])
def test_a_count_set_elsewhere_is_left_alone(env):
    n, count = fresh_process(PROBE.format(12), **env)
    assert n == "0"
    assert count == ("3" if "XLA_FLAGS" in env else "1")


def test_several_cpu_devices_compile_single_threaded():
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    assert devices.compiler_options(one) is None  # one device: XLA threads each op over the cores
    assert devices.compiler_options(two) == {"xla_cpu_multi_thread_eigen": False}
