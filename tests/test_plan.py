"""`podtrain plan`: the real train step compiled for a small TPU slice on this CPU machine."""

import dataclasses
import re
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason="plan compiles for TPUs with the libtpu wheel: pip install -e '.[tpu]' (CI does)")

from podtrain.launch import cli  # noqa: E402
from podtrain.parallel import devices as chips  # noqa: E402
from podtrain.parallel import mesh as meshes
from podtrain.plan import estimate, topology  # noqa: E402
from podtrain.train import config as configs  # noqa: E402

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.yaml")
# Dimensions are whole TPU tiles (8 x 128), so no shard is padded.
SMALL = [
    "model.num_layers=3",
    "model.d_model=1024",
    "model.num_heads=8",
    "model.num_kv_heads=8",
    "model.mlp_dim=1024",
    "model.vocab_size=1024",
    "model.dtype=bfloat16",
    "data.seq_len=64",
    "train.batch_size=8",
    "mesh.data=1",
    "mesh.fsdp=-1",
]
TINY = [
    "model.num_layers=2",
    "model.d_model=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.mlp_dim=128",
    "model.vocab_size=256",
    "data.seq_len=32",
    "train.batch_size=8",
    "mesh.data=1",
    "mesh.fsdp=-1",
]
# Mostly parameters (big vocab and MLP, few tokens), so sharding the state decides whether it fits.
STATE_HEAVY = [
    "model.num_layers=2",
    "model.d_model=256",
    "model.num_heads=1",
    "model.num_kv_heads=1",
    "model.mlp_dim=1024",
    "model.vocab_size=4096",
    "model.dtype=bfloat16",
    "data.seq_len=32",
    "train.batch_size=4",
    "mesh.data=-1",
    "mesh.fsdp=1",
]


@pytest.mark.slow
def test_plan_compiles_the_train_step_for_v5p_8():
    cfg = configs.load(None, SMALL)
    lines = []
    est = estimate.plan(cfg, "v5p-8", log=lines.append)
    assert (est.chips, est.device_kind, est.hbm) == (4, "TPU v5", 95 * 2**30) and est.fits
    assert "fits: yes" in lines[-1] and "FLOPs per step" in lines[-1]

    # Arguments are exactly this chip's shard of the train state plus its rows of the batch.
    pod_cfg = estimate._plan_config(cfg, 1)
    devs = topology.devices(topology.parse("v5p-8"))
    mesh = meshes.build_mesh(pod_cfg.mesh, devs)
    batch_bytes = 2 * (8 // 4) * 64 * 4  # inputs + targets, int32
    expected = estimate.state_bytes_per_chip(pod_cfg, mesh) + batch_bytes
    assert expected <= est.memory.arguments <= 1.01 * expected  # + a few padded scalars (step, Adam count)
    assert est.memory.total == pytest.approx(
        est.memory.arguments + est.memory.outputs - est.memory.aliased + est.memory.temporaries + est.memory.code
    )

    # Cost analysis counts the scanned layer body once; the corrected figure matches the same step
    # compiled with every layer unrolled (no loop), within the loop's own bookkeeping.
    scanned = estimate._cost(estimate.compile_step(pod_cfg, devs)[0])[0]
    unrolled = estimate._cost(
        estimate.compile_step(configs.replace(pod_cfg, model={"scan_layers": "unroll"}), devs)[0]
    )[0]
    assert scanned < 0.8 * unrolled
    assert est.flops == pytest.approx(unrolled, rel=0.03)
    assert 0.5 * est.flops * est.chips < est.model_flops < est.flops * est.chips
    assert est.agrees and est.cost_analysis_flops == est.flops  # dense: no ragged_dot kernel to correct
    assert "compiled / model = " in lines[-1] and "WARNING" not in lines[-1]
    assert est.step_s == max(
        est.flops / chips.PUBLISHED_PEAK["TPU v5"], est.bytes_accessed / chips.PUBLISHED_HBM_BANDWIDTH["TPU v5"]
    )


@pytest.mark.slow
def test_plan_two_slices_joins_them_over_dcn():
    cfg = configs.load(None, TINY)
    est = estimate.plan(cfg, "v5p-8", num_slices=2, log=lambda _: None)
    assert est.chips == 8 and est.dcn["data"] == 2 and est.mesh["fsdp"] == 4 and est.fits


@pytest.mark.slow
def test_does_not_fit_then_search_finds_a_layout_that_does(monkeypatch, capsys):
    cfg = configs.load(CONFIG, STATE_HEAVY)
    devs = topology.devices(topology.parse("v5p-8"))
    replicated = estimate.state_bytes_per_chip(cfg, meshes.build_mesh(cfg.mesh, devs))
    hbm = 0.9 * replicated  # a chip too small for the replicated state alone (data parallel)
    monkeypatch.setitem(chips.PUBLISHED_HBM, "TPU v5", hbm)

    code = cli.main(["plan", "--config", CONFIG, "--topology", "v5p-8", *STATE_HEAVY])
    out = capsys.readouterr().out
    assert code == 1 and "DOES NOT FIT: needs" in out and "HBM is" in out, out

    ranked = estimate.search(cfg, "v5p-8", log=lambda _: None)
    best = ranked[0]
    assert best.fits and best.mesh["fsdp"] > 1 and best.memory.total <= hbm
    assert all(not e.fits or e.step_s >= best.step_s for e in ranked)


def test_plan_rejects_bad_input(capsys):
    assert cli.main(["plan", "--config", CONFIG, "--topology", "v9x-8", *SMALL]) == 2
    assert "--topology='v9x-8'" in capsys.readouterr().err
    assert cli.main(["plan", "--config", CONFIG, "--topology", "v5p-8", "model.vocab_size=0"]) == 2
    assert "model.vocab_size=0" in capsys.readouterr().err
    assert cli.main(["plan", "--config", CONFIG, "--topology", "v5p-8", *SMALL, "mesh.tensor=3"]) == 2


@pytest.mark.slow
def test_compiler_out_of_memory_is_reported_with_its_figures(capsys):
    """Long context without remat: attention scores of every layer kept for the backward pass."""
    long_context = [
        "model.num_layers=2",
        "model.d_model=512",
        "model.num_heads=16",
        "model.num_kv_heads=8",
        "model.mlp_dim=1024",
        "model.vocab_size=1024",
        "model.dtype=bfloat16",
        "model.remat=none",
        "data.seq_len=8192",
        "train.batch_size=8",
        "mesh.data=-1",
    ]
    assert cli.main(["plan", "--config", CONFIG, "--topology", "v5litepod-4", *long_context]) == 1
    out = capsys.readouterr().out
    needed, available = map(float, re.search(r"compiler needs ([\d.]+) GiB per chip, ([\d.]+) GiB", out).groups())
    assert needed > available > 15 and "RESOURCE_EXHAUSTED" in out, out


def test_ragged_dot_kernels_are_charged_for_the_rows_routing_fills():
    """A lone ragged_dot compiled for a v5p chip: cost analysis charges the kernel 2 x rows x D x F,
    every row of its buffer; `_cost` keeps only the part balanced routing fills."""
    import jax
    import jax.numpy as jnp

    dev = topology.devices(topology.parse("v5p-8"))[0]
    rows, d, f, experts = 2048, 256, 512, 4

    def shape(*s, dt=jnp.bfloat16):
        return jax.ShapeDtypeStruct(s, dt, sharding=jax.sharding.SingleDeviceSharding(dev))

    compiled = (
        jax.jit(jax.lax.ragged_dot).lower(shape(rows, d), shape(experts, d, f), shape(experts, dt=jnp.int32)).compile()
    )
    [(buffer, tile, charged)] = estimate.ragged_kernels(compiled.as_text())
    assert buffer == rows and charged == 2 * rows * d * f and tile in (8, 16, 32, 64, 128, 256, 512)
    pairs = 256
    balanced, cost_analysis, _ = estimate._cost(compiled, (pairs, experts))
    assert cost_analysis == pytest.approx(charged, rel=0.01)
    assert balanced == pytest.approx(cost_analysis - charged * (1 - (pairs + experts * tile) / rows))
    assert estimate._cost(compiled)[0] == cost_analysis  # dense configs: nothing corrected


def test_a_large_flops_disagreement_is_a_warning():
    cfg = configs.load(None, TINY)
    est = estimate.Estimate(
        mesh={"data": 1, "fsdp": 8, "expert": 1, "tensor": 1},
        dcn={"data": 1, "fsdp": 1, "expert": 1, "tensor": 1},
        remat="full",
        device_kind="TPU v5",
        chips=8,
        hbm=95 * 2**30,
        memory=None,
        oom=None,
        flops=1e12,
        cost_analysis_flops=2e12,
        bytes_accessed=1e9,
        model_flops=8e12 / 1.3,
        peak_flops=459e12,
        hbm_bandwidth=2765e9,
        compile_s=1.0,
    )
    assert est.agrees and not any("WARNING" in line for line in estimate.flops_lines(est, cfg))
    assert any("cost analysis alone says" in line for line in estimate.flops_lines(est, cfg))
    off = dataclasses.replace(est, model_flops=8e12 / 8.9)
    warning = [line for line in estimate.flops_lines(off, cfg) if "WARNING" in line]
    assert not off.agrees and warning and "8.90x the model FLOPs" in warning[0]
    assert off.step_flops == off.flops  # work the compiled program does is kept
    low = dataclasses.replace(est, model_flops=8e12 * 2)  # the cost analysis misses work: model FLOPs instead
    assert not low.agrees and low.step_flops == low.model_flops / low.chips > low.flops
    assert low.step_s == low.model_flops / low.chips / low.peak_flops


@pytest.mark.skipif(
    not topology.has_cuda_plugin(),
    reason="compiling for GPUs needs JAX's CUDA plugin: pip install -e '.[gpu-plan]' (not in `make setup`: once "
    "installed, every JAX process on a machine without a GPU logs CUDA-driver notices)",
)
def test_plan_compiles_the_train_step_for_an_h100_node():
    """No GPU here: the CUDA plugin compiles for the H100 target description."""
    cfg = configs.load(None, TINY)
    lines = []
    est = estimate.plan(cfg, "h100-8", log=lines.append)
    assert (est.chips, est.hbm) == (8, chips.PUBLISHED_HBM["NVIDIA H100"]) and est.fits
    assert est.device_kind.startswith("NVIDIA H100") and est.peak_flops == chips.PUBLISHED_PEAK["NVIDIA H100"]
    assert est.agrees and "fits: yes" in lines[-1], lines[-1]
    pod_cfg = estimate._plan_config(cfg, 1)
    devs = topology.devices(topology.parse_target("h100-8"))
    expected = estimate.state_bytes_per_chip(pod_cfg, meshes.build_mesh(pod_cfg.mesh, devs)) + 2 * 1 * 32 * 4
    assert expected <= est.memory.arguments <= 1.05 * expected


def test_gpu_topology_names(capsys):
    assert topology.parse_target("h100-8") == topology.GpuNodes("h100", 1, 8)
    assert topology.parse_target("h100-32") == topology.GpuNodes("h100", 4, 8)
    assert topology.parse_target("v5p-256") == topology.parse("v5p-256")
    assert cli.main(["plan", "--config", CONFIG, "--topology", "h100-12", *TINY]) == 2
    assert "nodes of 8" in capsys.readouterr().err
    assert cli.main(["plan", "--config", CONFIG, "--topology", "h100-8", "--num-slices", "2", *TINY]) == 2
    assert "--topology=h100-16" in capsys.readouterr().err
    assert cli.main(["plan", "--config", CONFIG, "--topology", "a100-8", *TINY]) == 2
    assert "h100-8" in capsys.readouterr().err
