"""Bad MoE input is reported by the CLI in one line with exit code 2; shipped MoE config loads."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from podtrain.model.config import ModelConfig, MoEConfig
from podtrain.train import config as configs

ROOT = Path(__file__).resolve().parent.parent

BAD = {
    "k_gt_e": (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k=5"),
    "topk_groups_gt_n_groups": (
        ["model.moe.num_experts=8", "model.moe.n_groups=2", "model.moe.topk_groups=3"],
        "model.moe.topk_groups=3",
    ),
    "e_not_divisible_by_expert_axis": (["model.moe.num_experts=8", "mesh.expert=3"], "model.moe.num_experts=8"),
    "moe_outside_model": (["moe.num_experts=8"], "the MoE section lives in model.moe"),
    "unknown_router": (["model.moe.num_experts=8", "model.moe.router=softmax_top2"], "model.moe.router='softmax_top2'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_rejects_bad_moe_input(case, tmp_path):
    overrides, names = BAD[case]
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "podtrain.launch.cli",
            "pretrain",
            "--config",
            "configs/shakespeare_char.yaml",
            f"run.dir={run_dir}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("podtrain pretrain: error:"), proc.stderr
    assert names in lines[0]
    assert not run_dir.exists()


def test_shipped_moe_config_has_the_active_parameters_of_the_dense_one():
    moe = configs.load(ROOT / "configs/shakespeare_moe.yaml")
    dense = configs.load(ROOT / "configs/shakespeare_char.yaml")
    assert dataclasses.replace(moe.model, moe=MoEConfig()) == dense.model
    assert moe.model.moe.num_experts == 8 and moe.model.moe.top_k == 2
    m = dataclasses.replace(moe.model, vocab_size=65)
    router_flops = 6 * m.num_layers * m.d_model * m.moe.num_experts
    assert m.flops_per_token(64) == dataclasses.replace(m, moe=MoEConfig()).flops_per_token(64) + router_flops


def test_layer_placement():
    moe = MoEConfig(num_experts=4, first_dense_layers=1, every=2)
    assert [i for i in range(5) if moe.is_moe_layer(i)] == [1, 3]
    with pytest.raises(ValueError, match="model.moe.every=2"):
        ModelConfig(num_layers=4, moe=moe)
