"""Which parameters a fine-tune trains: all (full), all but a regex (freeze), or LoRA factors.

Fine-tuning state params are {'train': ..., 'frozen': ...} (train/step.py differentiates and
updates only 'train'); `materialize(train, frozen)` rebuilds the base model's parameter tree.
Parameter paths are slash-joined keys, e.g. 'blocks/attn/wq', 'embed'.

LoRA: a targeted weight W with logical axes (layers?, exp?, in..., out...) gets factors
a: (layers?, exp?, prod(in), r) ~ N(0, 1/prod(in)) and b: (layers?, exp?, r, prod(out)) = 0, and the
model sees W + (alpha / r) * (a @ b) reshaped to W's shape, so at the start it is exactly the base
model. Leading 'layers' and 'exp' axes are batch axes: one pair of factors per layer and per MoE
expert. The input dimensions are 'embed' when it comes first (wq, w_up, lm_head, expert w_up),
else all dimensions before a trailing 'embed' (wo, w_down, the embedding table).

MoE models: buffers (router biases) are not parameters; they come from the base run as they are
and move during fine-tuning only by model.moe.bias_update_rate (train/step.py).
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from podtrain.model import ModelConfig, axes
from podtrain.parallel import rules
from podtrain.train import state as states
from podtrain.train.config import ConfigError, FinetuneConfig


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def flatten(tree) -> dict:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return tree


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How one fine-tuning mode splits, initializes and rebuilds the parameters."""

    mode: str
    frozen_paths: tuple[str, ...]  # base parameters kept bitwise unchanged (all of them for LoRA)
    lora: dict[str, tuple[tuple[int, ...], int, int]]  # path -> (layer dims, in size, out size)
    rank: int = 0
    scale: float = 0.0

    @property
    def materialize(self):
        return None if self.mode == "full" else self._materialize

    def _materialize(self, train: dict, frozen: dict) -> dict:
        if self.mode == "freeze":
            return unflatten({**train, **frozen})
        merged = dict(frozen)
        for path, ab in train.items():
            w = frozen[path]
            delta = jnp.matmul(ab["a"], ab["b"]).reshape(w.shape)
            merged[path] = w + (self.scale * delta).astype(w.dtype)
        return unflatten(merged)

    def split(self, params: dict, key) -> dict:
        """Base model params -> {'train', 'frozen'} (or params itself for full), LoRA factors initialized."""
        if self.mode == "full":
            return params
        flat = flatten(params)
        frozen = {p: flat[p] for p in self.frozen_paths}
        if self.mode == "freeze":
            return {"train": {p: v for p, v in flat.items() if p not in frozen}, "frozen": frozen}
        train = {}
        for i, (path, (layer_dims, n_in, n_out)) in enumerate(sorted(self.lora.items())):
            a = jax.random.normal(jax.random.fold_in(key, i), (*layer_dims, n_in, self.rank)) / math.sqrt(n_in)
            train[path] = {"a": a, "b": jnp.zeros((*layer_dims, self.rank, n_out))}
        return {"train": train, "frozen": frozen}

    def merged(self, params: dict) -> dict:
        """Fine-tuning state params -> the base model's tree (LoRA factors merged): for export."""
        return params if self.mode == "full" else self._materialize(params["train"], params["frozen"])


def build(cfg: FinetuneConfig, model_cfg: ModelConfig) -> Adapter:
    _, abstract_vars, _ = states.abstract_model(model_cfg)
    names = {path_str(p): v.get_metadata().get("out_sharding") for p, v in nnx.to_flat_state(abstract_vars)}
    shapes = {path_str(p): v.shape for p, v in nnx.to_flat_state(abstract_vars)}
    if cfg.mode == "full":
        return Adapter("full", (), {})
    if cfg.mode == "freeze":
        frozen = tuple(p for p in sorted(names) if re.search(cfg.freeze, p))
        if not frozen or len(frozen) == len(names):
            raise ConfigError(
                f"finetune.freeze={cfg.freeze!r} matches {len(frozen)} of the {len(names)} parameters "
                f"({', '.join(sorted(names))}): it must match some but not all"
            )
        return Adapter("freeze", frozen, {})
    lora = {p: _lora_dims(p, names[p], shapes[p]) for p in sorted(names) if re.search(cfg.lora_targets, p)}
    if not lora:
        raise ConfigError(
            f"finetune.lora_targets={cfg.lora_targets!r} matches no parameter (paths: {', '.join(sorted(names))})"
        )
    return Adapter("lora", tuple(sorted(names)), lora, cfg.lora_rank, cfg.lora_alpha / cfg.lora_rank)


def _lora_dims(path: str, names, shape) -> tuple[tuple[int, ...], int, int]:
    """(batch dims: leading 'layers' / 'exp' sizes, input size, output size) of a LoRA target."""
    names = tuple(names or ())
    n_batch = 0
    while n_batch < len(names) and names[n_batch] in _BATCH_AXES:
        n_batch += 1
    rest = list(zip(names[n_batch:], shape[n_batch:]))
    if len(rest) < 2 or axes.EMBED not in (rest[0][0], rest[-1][0]) or any(n in _BATCH_AXES for n, _ in rest):
        raise ConfigError(
            f"finetune.lora_targets matches {path} (axes {names}): LoRA needs a matrix whose first or "
            f"last axis is 'embed' after any leading 'layers'/'exp' axes; narrow the regex"
        )
    split = 1 if rest[0][0] == axes.EMBED else len(rest) - 1
    return tuple(shape[:n_batch]), math.prod(d for _, d in rest[:split]), math.prod(d for _, d in rest[split:])


_BATCH_AXES = (axes.LAYERS, axes.EXP)  # one pair of LoRA factors per layer and per expert


def shardings(adapter: Adapter, model_shardings: dict, mesh: Mesh):
    """Shardings of the fine-tuning params: base ones for base parameters, LoRA factors replicated."""
    if adapter.mode == "full":
        return model_shardings
    flat = flatten(model_shardings)
    frozen = {p: flat[p] for p in adapter.frozen_paths}
    if adapter.mode == "freeze":
        return {"train": {p: s for p, s in flat.items() if p not in frozen}, "frozen": frozen}
    replicated = NamedSharding(mesh, PartitionSpec())
    return {"train": {p: {"a": replicated, "b": replicated} for p in adapter.lora}, "frozen": frozen}


def layout(adapter: Adapter, model_cfg: ModelConfig, tx, mesh: Mesh) -> states.Layout:
    """The fine-tuning state's Layout: pretraining's (train/state.py), params split by the adapter
    and optimizer state for the trained part only."""
    base = states.layout(model_cfg, tx, mesh)
    if adapter.mode == "full":
        return base
    abstract_params = jax.eval_shape(lambda p: adapter.split(p, jax.random.key(0)), base.abstract.params)
    param_shardings = shardings(adapter, base.state.params, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params["train"])
    opt_shardings = rules.opt_state_shardings(tx, abstract_opt, param_shardings["train"], mesh)
    state_shardings = base.state.replace(params=param_shardings, opt_state=opt_shardings)
    shapes = base.abstract.replace(params=abstract_params, opt_state=abstract_opt)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings)
    return states.Layout(base.graphdef, mesh, state_shardings, abstract)


def init_state(
    adapter: Adapter, base_params: dict, base_buffers: dict, tx, lay: states.Layout, seed: int
) -> states.TrainState:
    """Fresh optimizer and step 0 around the base parameters and buffers (LoRA factors from the seed)."""

    def init(params, buffers, key):
        params = adapter.split(params, key)
        train = params if adapter.mode == "full" else params["train"]
        return states.TrainState(params, tx.init(train), jnp.zeros((), "int32"), states.rng_key(seed), buffers)

    key = jax.random.fold_in(jax.random.key(seed), 2)
    return jax.jit(init, out_shardings=lay.state)(base_params, base_buffers, key)
