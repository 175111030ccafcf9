"""A run's model weights in the model's own parameter tree, whichever verb trained the run.

Pretraining and full fine-tuning checkpoint the model's tree itself; freeze and LoRA fine-tuning
checkpoint {'train': ..., 'frozen': ...} (train/adapters.py), which `finetune.merged_params`
rebuilds into the model's tree (LoRA factors merged). `sample` and `export` read runs through
`load` only, so they accept every kind of run the same way.
"""

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from podtrain.data import tokenizer
from podtrain.train import checkpoint, finetune
from podtrain.train import config as configs
from podtrain.train import state as states
from podtrain.train.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class RunWeights:
    cfg: Config
    tok: tokenizer.Tokenizer | None  # None: the run has no tokenizer/ folder (an imported model without one)
    graphdef: nnx.GraphDef
    params: dict  # the model's parameter tree, arrays on the first local device
    buffers: dict  # the model's other variables (the MoE router bias); {} for dense models
    step: int

    @property
    def variables(self) -> dict:
        """Parameters and buffers as one tree (they live side by side in the model)."""
        return merge_trees(self.params, self.buffers)


def abstract_trees(cfg: Config) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, parameters, buffers) of cfg's model; the trees as pure dicts of shapes."""
    graphdef, params, buffers = states.abstract_model(cfg.model)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


def load(run_dir: str | Path, step: int | None = None, flag: str = "run") -> RunWeights:
    """The weights of `run_dir` at `step` (default: its newest valid step).

    `flag` names the user's input in errors ('--run' for sample): a missing run or step is a
    ConfigError naming it.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{flag} {run_dir}: not a podtrain run (no config.yaml)")
    cfg = configs.load(run_dir / "config.yaml")
    graphdef, abstract_params, abstract_buffers = abstract_trees(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    on_device = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    full = cfg.finetune.mode == "full"  # pretraining and full fine-tuning: the model's own tree
    parts = {"buffers": on_device(abstract_buffers)} if jax.tree.leaves(abstract_buffers) else {}
    if full:
        parts["params"] = on_device(abstract_params)
    try:
        if not full:
            merged, step = finetune.merged_params(run_dir, step)
        restored, step = checkpoint.restore_parts(run_dir, parts, step) if parts else ({}, step)
    except FileNotFoundError as e:
        raise ConfigError(f"{flag} {run_dir}: {e}") from None
    params = restored["params"] if full else jax.device_put(_check_tree(merged, abstract_params), device)
    tok = tokenizer.load_run(run_dir)
    return RunWeights(cfg, tok, graphdef, params, restored.get("buffers", {}), step)


def _check_tree(params: dict, abstract: dict) -> dict:
    """`params` if it has the model's tree and shapes (a fine-tuning adapter that rebuilt another
    model would otherwise surface as a shape error deep inside sampling or export)."""

    def shapes(tree):
        return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    got, want = shapes(params), shapes(abstract)
    if got != want:
        diffs = sorted(set(got.items()) ^ set(want.items()), key=str)[:4]
        raise RuntimeError(f"merged fine-tuning parameters do not have the model's tree: {diffs}")
    return params


def merge_trees(a: dict, b: dict) -> dict:
    """One tree of two nested dicts with disjoint leaves."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and key in out else value
    return out
