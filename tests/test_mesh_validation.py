"""Mesh degrees, -1 fill, and the config-vs-mesh checks that run before anything compiles."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from podtrain.launch import cli
from podtrain.parallel import mesh as meshes
from podtrain.parallel import rules
from podtrain.parallel.config import MeshConfig
from podtrain.train import config as configs
from podtrain.train import optim, validate
from podtrain.train import state as states
from podtrain.train.config import ConfigError

MODEL = [
    "model.num_layers=1",
    "model.d_model=64",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.mlp_dim=128",
    "model.vocab_size=64",
    "train.batch_size=16",
]


def config(*overrides: str) -> configs.Config:
    return configs.load(None, MODEL + list(overrides))


@pytest.mark.parametrize(
    "mesh, devices, ici, dcn",
    [
        (MeshConfig(), 8, (8, 1, 1, 1), (1, 1, 1, 1)),  # data=-1 takes everything
        (MeshConfig(data=-1, tensor=2), 8, (4, 1, 1, 2), (1, 1, 1, 1)),
        (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 1, 2), (1, 1, 1, 1)),
        (MeshConfig(data=1, fsdp=-1, dcn_data=2), 8, (1, 4, 1, 1), (2, 1, 1, 1)),  # fills per slice
        (MeshConfig(data=1, fsdp=32, tensor=4, dcn_data=2), 256, (1, 32, 1, 4), (2, 1, 1, 1)),
    ],
)
def test_minus_one_fills_the_remaining_devices(mesh, devices, ici, dcn):
    assert meshes.resolve_degrees(mesh, devices) == (ici, dcn)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mesh.data=2", "mesh.fsdp=2"], "mesh.data=2 x mesh.fsdp=2 multiplies to 4, but there are 8 devices"),
        (["mesh.data=-1", "mesh.tensor=3"], "leaves no whole degree for the -1 axis"),
        (["mesh.dcn_data=3"], "mesh.dcn_data=3 makes 3 slices, which does not divide the 8 devices"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one ICI degree may be -1"),
        (["mesh.tensor=0"], "mesh.tensor=0 must be >= 1 or -1"),
        (["mesh.devices=16"], "mesh.devices=16 is more than the 8 devices here"),
        (["mesh.data=1", "mesh.tensor=8"], "model.num_heads=4 is not divisible by the tensor-parallel degree 8"),
        (["mesh.data=2", "mesh.tensor=4", "model.mlp_dim=130"], "model.mlp_dim=130 is not divisible"),
        (["mesh.data=1", "mesh.tensor=2", "mesh.dcn_tensor=4"], "tensor-parallel degree 8"),
        (["mesh.data=4", "mesh.expert=2"], "mesh.expert x mesh.dcn_expert = 2 but the model is dense"),
        (
            ["train.batch_size=12"],
            "train.batch_size=12 / train.grad_accum_steps=1 = 12 sequences per microbatch "
            "is not divisible by the data-parallel degree 8",
        ),
        (["train.grad_accum_steps=4"], "= 4 sequences per microbatch is not divisible by the data-parallel degree 8"),
        (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=6"], "data-parallel degree 4"),
    ],
)
def test_bad_layouts_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate.build_mesh(config(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_layouts_pass():
    for overrides in (
        ["mesh.data=2", "mesh.tensor=4"],
        ["mesh.fsdp=-1", "mesh.data=1", "mesh.dcn_data=2"],
        ["mesh.devices=1", "train.grad_accum_steps=16"],
        ["model.num_kv_heads=2", "mesh.data=2", "mesh.tensor=4"],  # GQA: kv heads stay whole
    ):
        validate.build_mesh(config(*overrides))


def test_expert_degree_against_moe_models():
    moe = config("model.moe.num_experts=4")
    validate.check_expert(moe, 2)
    validate.check_expert(moe, 4)
    with pytest.raises(ConfigError, match="expert-parallel degree 8 .* does not divide the 4 experts"):
        validate.check_expert(moe, 8)


def test_cli_reports_a_bad_mesh_in_one_line_before_touching_disk(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(
        [
            "pretrain",
            "--config",
            str(Path(__file__).parents[1] / "configs" / "shakespeare_char.yaml"),
            "mesh.data=1",
            "mesh.tensor=8",
            f"run.dir={run_dir}",
            f"data.data_dir={tmp_path / 'tfds'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.num_heads=4" in err
    assert not run_dir.exists() and not (tmp_path / "tfds").exists()


def test_emulated_dcn_groups_consecutive_devices():
    """dcn data=2 x ici fsdp=4 in one process: each DCN group (a 'slice') is 4 consecutive devices."""
    mesh = meshes.build_mesh(MeshConfig(data=1, fsdp=4, dcn_data=2))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids.shape == (2, 4, 1, 1)
    assert ids[0].ravel().tolist() == [0, 1, 2, 3] and ids[1].ravel().tolist() == [4, 5, 6, 7]


def test_gqa_kv_heads_fewer_than_tensor_stay_whole():
    cfg = config("model.num_kv_heads=2", "mesh.data=2", "mesh.tensor=4")
    _, abstract, _ = states.abstract_model(cfg.model)
    specs = nnx.to_pure_dict(rules.param_specs(abstract, validate.build_mesh(cfg)))
    assert specs["blocks"]["attn"]["wk"] == jax.sharding.PartitionSpec(None, None, None, None)
    assert specs["blocks"]["attn"]["wq"] == jax.sharding.PartitionSpec(None, None, "tensor", None)


def test_optimizer_moments_shard_like_their_params():
    cfg = config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, validate.build_mesh(cfg))
    adam = next(s for s in jax.tree.leaves(lay.state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))
    for moments in (adam.mu, adam.nu):
        assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(lambda s: s.spec, lay.params)
    assert any("fsdp" in s.spec for s in jax.tree.leaves(adam.mu))


def test_each_process_reads_its_block_of_the_batch():
    mesh = validate.build_mesh(config("mesh.data=1", "mesh.fsdp=4", "mesh.dcn_data=2"))
    assert rules.process_batch_slice(rules.batch_sharding(mesh), 16) == (0, 1)  # one process: all rows
