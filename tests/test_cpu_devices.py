"""On a CPU host pretraining (`podtrain pretrain` or `pretrain(cfg)`) makes each core a JAX device
(parallel/devices.py); steps compiled for several CPU devices in one process run their ops
single-threaded."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from podtrain.parallel import devices
from podtrain.train import config as configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = len(os.sched_getaffinity(0))


def fresh_process(code: str, **env) -> str:
    """stdout of `code` in a new interpreter (the device count is fixed once a backend starts)."""
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PODTRAIN_COORDINATOR")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.split()


PROBE = "from podtrain.parallel import devices; n = devices.use_cpu_cores({}); import jax; print(n, jax.device_count())"
RULE_PROBE = (
    "from podtrain.parallel import devices; from podtrain.train import config; "
    f"cfg = config.load({os.path.join(ROOT, 'configs', 'shakespeare_char.yaml')!r}, OVERRIDES); "
    "devices.use_cpu_cores_for(cfg.mesh, cfg.train.batch_size // cfg.train.grad_accum_steps, cfg.model.d_model); "
    "import jax; print(jax.device_count())"
)


@pytest.mark.parametrize("batch", [12, 7, None])
def test_one_device_per_core_dividing_the_batch(batch):
    want = max(d for d in range(1, CORES + 1) if batch is None or batch % d == 0)
    assert fresh_process(PROBE.format(batch)) == [str(want), str(want)]


PER_CORE_12 = str(max(d for d in range(1, CORES + 1) if 12 % d == 0))  # cores dividing a batch of 12


def test_a_large_model_gets_one_device():
    assert fresh_process(PROBE.format(f"12, d_model={devices.ONE_DEVICE_FROM_D_MODEL}")) == ["1", "1"]
    assert fresh_process(PROBE.format(f"12, d_model={devices.ONE_DEVICE_FROM_D_MODEL - 1}")) == [PER_CORE_12] * 2


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
@pytest.mark.parametrize(
    "overrides, want",
    [
        ([], "per core"),  # d_model 128
        (["model.d_model=512", "model.num_heads=8", "model.num_kv_heads=8"], "1"),
        (["model.d_model=512", "model.num_heads=8", "model.num_kv_heads=8", "mesh.data=2"], "per core"),  # asked for
        (["model.d_model=512", "model.num_heads=8", "model.num_kv_heads=8", "mesh.devices=2"], "per core"),
    ],
)
def test_pretrain_picks_the_layout_from_the_model_unless_the_mesh_asks(overrides, want):
    code = RULE_PROBE.replace("OVERRIDES", repr(overrides))
    assert fresh_process(code) == [PER_CORE_12 if want == "per core" else want]


@pytest.mark.slow  # two training runs in fresh interpreters
@pytest.mark.skipif(CORES < 2, reason="needs 2 cores: on one core every layout is one device")
def test_pretrain_from_python_lays_out_the_cpu_like_the_cli(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    cfg = tiny_config("mesh.devices=0", "train.steps=1", "train.eval_every=1", "data.eval_batches=1")
    config.write_text(configs.dump(cfg))  # mesh.devices=0: the layout is left to the rule
    cli_args = ["pretrain", "--config", str(config), f"run.dir={tmp_path / 'cli'}"]
    library_overrides = [f"run.dir={tmp_path / 'library'}"]
    cli_run = (
        f"import jax; from podtrain.launch import cli; assert cli.main({cli_args!r}) == 0; print(jax.device_count())"
    )
    library_run = (
        "import jax; from podtrain.train import config, loop; "
        f"loop.pretrain(config.load({str(config)!r}, {library_overrides!r})); print(jax.device_count())"
    )
    per_core = str(max(d for d in range(1, CORES + 1) if 8 % d == 0))  # the tiny config's batch is 8
    assert fresh_process(cli_run)[-1] == fresh_process(library_run)[-1] == per_core


@pytest.mark.parametrize(
    "env",
    [
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},  # the user's count
        {"PODTRAIN_COORDINATOR": "127.0.0.1:1"},  # a launcher's job sets its own count
    ],
)
def test_a_count_set_elsewhere_is_left_alone(env):
    n, count = fresh_process(PROBE.format(12), **env)
    assert n == "0"
    assert count == ("3" if "XLA_FLAGS" in env else "1")


def test_a_running_backend_keeps_its_count():
    code = "import jax; jax.devices(); " + PROBE.format(12)  # the caller used JAX first
    assert fresh_process(code) == ["0", "1"]


def test_several_cpu_devices_compile_single_threaded():
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    assert devices.compiler_options(one) is None  # one device: XLA threads each op over the cores
    assert devices.compiler_options(two) == {"xla_cpu_multi_thread_eigen": False}
