"""Golden sharding snapshots: every parameter's shape and PartitionSpec, per shipped config and layout.

Every configs/*.yaml is snapshotted (a new config fails here until its snapshot is committed).
After an intended change of the rules, the model or a config, regenerate and review the diff:

    PODTRAIN_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding_golden.py
    git diff tests/golden/sharding
"""

import difflib
import os
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from podtrain.parallel import mesh as meshes
from podtrain.parallel import rules
from podtrain.parallel.config import AXES, MeshConfig
from podtrain.train import config as configs
from podtrain.train import state as states
from podtrain.train import validate
from podtrain.train.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "sharding"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
UPDATE = os.environ.get("PODTRAIN_UPDATE_GOLDEN") == "1"
VOCAB_STAND_IN = 65  # for configs taking vocab_size from the tokenizer: tiny-shakespeare's char vocab

# name: (device count, mesh degrees); meshes are abstract, so pod-sized layouts cost nothing.
LAYOUTS = {
    "data=8": (8, MeshConfig(data=8)),
    "fsdp=8": (8, MeshConfig(data=1, fsdp=8)),
    "tensor=4 x data=2": (8, MeshConfig(data=2, tensor=4)),
    "fsdp=2 x tensor=2 x data=2": (8, MeshConfig(data=2, fsdp=2, tensor=2)),
    "v5p-256: dcn data=2 x fsdp=32 x tensor=4": (256, MeshConfig(data=1, fsdp=32, tensor=4, dcn_data=2)),
}


def snapshot(config_path: Path) -> str:
    cfg = configs.load(config_path)
    lines = [f"# parameter shardings of configs/{config_path.name}; regenerate: see tests/test_sharding_golden.py"]
    if cfg.model.vocab_size == 0:
        lines.append(f"# model.vocab_size=0 (from the tokenizer): snapshot taken with vocab_size={VOCAB_STAND_IN}")
        cfg = configs.replace(cfg, model={"vocab_size": VOCAB_STAND_IN})
    _, abstract, buffers = states.abstract_model(cfg.model)
    abstract = nnx.State.merge(abstract, buffers)  # MoE router biases are sharded too
    for name, (devices, mesh_cfg) in LAYOUTS.items():
        ici, dcn = meshes.resolve_degrees(mesh_cfg, devices)
        mesh = AbstractMesh(tuple(i * d for i, d in zip(ici, dcn)), AXES)
        lines += ["", f"[{name}]  {devices} devices, mesh {dict(mesh.shape)}"]
        try:
            validate.check_tensor(cfg, mesh.shape["tensor"])
            validate.check_expert(cfg, mesh.shape["expert"])
        except ConfigError as e:
            lines.append(f"invalid: {e}")
            continue
        specs = nnx.to_pure_dict(rules.param_specs(abstract, mesh))
        shapes = nnx.to_pure_dict(abstract)
        is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
        for (path, spec), shape in zip(
            jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec), jax.tree.leaves(shapes), strict=True
        ):
            dotted = ".".join(str(k.key) for k in path)
            lines.append(f"{dotted:<28} {str(shape.shape):<18} {spec}")
    return "\n".join(lines) + "\n"


def test_every_config_is_snapshotted():
    assert CONFIGS, "no configs/*.yaml found"
    stale = {p.stem for p in GOLDEN.glob("*.txt")} - {p.stem for p in CONFIGS}
    assert not stale, f"snapshots of configs that no longer exist: {sorted(stale)}; delete them"


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_sharding_matches_golden(config_path):
    golden = GOLDEN / f"{config_path.stem}.txt"
    text = snapshot(config_path)
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    if not golden.exists():
        pytest.fail(f"{golden.relative_to(ROOT)} is missing: run PODTRAIN_UPDATE_GOLDEN=1 pytest {__file__}")
    expected = golden.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), "golden", "now"))
    assert text == expected, f"shardings changed for {config_path.name}:\n{diff}"
