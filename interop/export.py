"""Export a run's weights (Hugging Face `transformers` or our own safetensors) and import HF models.

`export(run_dir, out, ...)` streams: the stacked layer arrays are sliced one layer at a time and
fetched to the host with `jax.device_get`, and safetensors shards are written as they fill, so the
host holds at most one shard plus one layer. `import_hf(hf_dir, run_dir)` reads safetensors only
(never pickle) and writes a run dir (config.yaml, the model's tokenizer files in tokenizer/, an Orbax
checkpoint at step 0) that `sample`, `export` and fine-tuning accept.
"""

import collections
import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from podtrain.data import tokenizer
from podtrain.inference import weights
from podtrain.interop import hf
from podtrain.train import checkpoint, integrity
from podtrain.train import config as configs
from podtrain.train.config import Config, ConfigError

FORMATS = ("hf", "safetensors")
DEFAULT_MAX_SHARD = "5GB"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from '5GB', '500MiB', '1000' (decimal and binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size={text!r} must be a positive size such as 5GB, 500MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise ConfigError("safetensors is not installed: pip install 'podtrain[hf]'") from None
    return safetensors


class ShardWriter:
    """Writes tensors into safetensors files of at most `max_bytes` (one tensor may exceed it).

    One file is `model.safetensors`; more are `model-0000k-of-0000n.safetensors` with an index
    `model.safetensors.index.json` mapping each tensor name to its file.
    """

    def __init__(self, out_dir: Path, max_bytes: int, metadata: dict[str, str]):
        self.out_dir, self.max_bytes, self.metadata = out_dir, max_bytes, metadata
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        for name, x in tensors.items():
            if self.pending and self.pending_bytes + x.nbytes > self.max_bytes:
                self._flush()
            self.pending[name] = x
            self.pending_bytes += x.nbytes
            self.total_bytes += x.nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.files):05d}.partial"
        _safetensors().numpy.save_file(self.pending, str(path), metadata=self.metadata)
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            self.files[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for k, (path, names) in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class TensorReader:
    """Tensors of a safetensors checkpoint (one file or an index), read one at a time, no pickle."""

    def __init__(self, directory: Path):
        index, single = directory / INDEX, directory / "model.safetensors"
        if index.exists():
            weight_map = hf.read_json(index).get("weight_map", {})
            self.files = {name: directory / f for name, f in weight_map.items()}
        elif single.exists():
            with _safetensors().safe_open(str(single), framework="numpy") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
            extra = (
                f" (found {', '.join(found)}: pickle files are never loaded; re-save with safetensors)" if found else ""
            )
            raise ConfigError(f"--hf {directory}: no model.safetensors or {INDEX}{extra}")

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        with _safetensors().safe_open(str(self.files[name]), framework="numpy") as f:
            return f.get_tensor(name)


# ---------------------------------------------------------------------------------------------
# Fetching a run's layers to the host, one at a time.
# ---------------------------------------------------------------------------------------------


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


STACKS = ("blocks", "moe_units")  # top-level params holding layers stacked on a leading axis


def _globals(params: dict) -> dict:
    """Everything outside the layer stacks, fetched to the host."""
    return jax.tree.map(_host, {k: v for k, v in params.items() if k not in STACKS})


def _layer(stack: dict, i: int) -> dict:
    """Layer i of a stack of layers, fetched to the host alone."""
    return jax.tree.map(lambda x: _host(x[i]), stack)


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty: pass a new directory (nothing is overwritten)")


def _write_hf(cfg: Config, tok, params, tmp: Path, max_bytes: int) -> None:
    config_json = hf.to_hf_config(cfg)  # raises for inexpressible features before any tensor moves
    writer = ShardWriter(tmp, max_bytes, {"format": "pt"})
    host_globals, layer, at = _globals(params), None, None
    for t in hf.tensor_plan(cfg):
        if t.empty is not None:
            writer.add({t.hf: np.zeros(t.empty, np.float32)})
            continue
        if not t.index:
            x = hf.get_path(host_globals, t.path)
        else:
            if at != (t.stack, t.index[0]):  # the next layer: fetch it alone
                at, layer = (t.stack, t.index[0]), _layer(params[t.stack], t.index[0])
            x = hf.get_path(layer, t.inner)[t.index[1:]]
        writer.add({t.hf: hf.to_hf_tensor(x, t.kind)})
    writer.close()
    generation = hf.generation_config(cfg, tok)
    config_json.update({k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tok is not None:
        _write_hf_tokenizer(cfg, tok, tmp)


def _write_hf_tokenizer(cfg: Config, tok: tokenizer.Tokenizer, tmp: Path) -> None:
    """HF and SentencePiece tokenizers: their own files as they are; char and byte: an equivalent
    tokenizer.json. Either way `transformers.AutoTokenizer` on the export gives our ids."""
    if tok.kind in ("hf", "sentencepiece"):
        tok.save(tmp)
        if tok.kind == "sentencepiece":
            (tmp / tokenizer.HF_CONFIG).write_bytes(tok.transformers_config())
        return
    hf.hf_tokenizer(tok).save(str(tmp / tokenizer.HF_FILE))
    (tmp / tokenizer.HF_CONFIG).write_text(json.dumps(hf.tokenizer_config(cfg), indent=2) + "\n")


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _write_safetensors(cfg: Config, tok, params, tmp: Path, max_bytes: int) -> None:
    """Our own names ('embed', 'blocks.3.attn.wq', ...), one tensor per layer, config.yaml beside."""
    writer = ShardWriter(tmp, max_bytes, {"format": "podtrain"})
    writer.add(_flatten(_globals(params)))
    for stack in STACKS:
        for i in range(len(jax.tree.leaves(params[stack])[0]) if stack in params else 0):
            writer.add(_flatten(_layer(params[stack], i), f"{stack}.{i}."))
    writer.close()
    (tmp / "config.yaml").write_text(configs.dump(cfg))
    if tok is not None:
        tokenizer.save_run(tok, tmp)


def export(
    run_dir: str | Path,
    out: str | Path,
    fmt: str = "hf",
    step: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> Path:
    """Write the weights of `run_dir` (at `step`, default latest) to the new directory `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}")
    max_bytes = parse_size(max_shard_size)
    _check_out(out)
    run = weights.load(run_dir, step)
    if fmt == "hf":
        hf.to_hf_config(run.cfg)  # fail before writing anything
        biases = [x for path, x in jax.tree_util.tree_flatten_with_path(run.buffers)[0] if path[-1].key == "bias"]
        if biases:
            hf.check_router_bias(run.cfg, float(min(_host(b).min() for b in biases)))
    tmp = _staging(out)
    try:
        (_write_hf if fmt == "hf" else _write_safetensors)(run.cfg, run.tok, run.variables, tmp, max_bytes)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------


def _read_params(cfg: Config, reader: TensorReader) -> tuple[dict, dict]:
    """Our (params, buffers) as host numpy float32 from the HF tensors; every tensor must be used,
    every parameter filled. Buffers the class has no tensor for (Mixtral's router bias) stay 0."""
    _, abstract_params, abstract_buffers = weights.abstract_trees(cfg)
    params = jax.tree.map(lambda x: np.empty(x.shape, np.float32), abstract_params)
    buffers = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract_buffers)
    tree = weights.merge_trees(params, buffers)
    filled = collections.Counter()
    unused = reader.names()
    for t in hf.tensor_plan(cfg):
        if t.hf not in unused:
            raise ConfigError(f"--hf: tensor {t.hf} is missing from the safetensors files")
        unused.discard(t.hf)
        if t.empty is not None:
            if reader.get(t.hf).size:
                raise ConfigError(f"--hf: tensor {t.hf} is not empty: a feature podtrain does not implement")
            continue
        target = hf.get_path(tree, t.path)
        shape = target.shape[len(t.index) :]
        expected = hf.to_hf_tensor(np.empty(shape, np.float32), t.kind).shape
        x = reader.get(t.hf)
        if tuple(x.shape) != tuple(expected):
            raise ConfigError(f"--hf: tensor {t.hf} has shape {tuple(x.shape)}, config.json implies {expected}")
        target[t.index] = hf.from_hf_tensor(x.astype(np.float32, copy=False), t.kind, shape)
        filled[t.path] += x.size
    if unused:
        raise ConfigError(
            f"--hf: tensors podtrain has no place for (a feature it does not implement): "
            f"{', '.join(sorted(unused)[:4])}"
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(k.key) for k in path)
        if filled[name] != leaf.size:  # a bug in the tensor plan, not bad input
            raise RuntimeError(f"import: {name} got {filled[name]} of its {leaf.size} values from the HF tensors")
    return params, buffers


def write_run(cfg: Config, tok, params: dict, buffers: dict, run_dir: Path, step: int = 0) -> Path:
    """A run dir holding `params` (and `buffers`) as a sealed checkpoint at `step`, with config.yaml
    and the tokenizer/ folder when `tok` is given: what `sample`, `finetune` and `export` read."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(configs.dump(cfg))
    state = {"params": params, "step": np.asarray(step, np.int32)}
    if jax.tree.leaves(buffers):
        state["buffers"] = buffers
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(configs.to_dict(cfg))}
    if tok is not None:
        tokenizer.save_run(tok, run_dir)
        items["tokenizer"] = ocp.args.JsonSave(tok.spec())
    root = run_dir.resolve() / checkpoint.DIRNAME
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(root, options=options) as mngr:
        mngr.save(step, args=ocp.args.Composite(**items))
    integrity.seal(root / str(step), step)  # the manifest that makes the step valid to restore
    return run_dir


def import_hf(hf_dir: str | Path, run_dir: str | Path, overrides: list[str] = ()) -> Path:
    """Import a `transformers` checkpoint directory (config.json + safetensors) as a new run dir."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not (hf_dir / "config.json").exists():
        raise ConfigError(f"--hf {hf_dir}: no config.json (expected a transformers model directory)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} exists and is not empty: pass a new run directory")
    sections = hf.from_hf_config(hf.read_json(hf_dir / "config.json"))
    tok = None
    if any((hf_dir / name).exists() for name in (tokenizer.HF_FILE, tokenizer.SP_FILE)):
        tok = tokenizer.load(hf_dir, f"--hf {hf_dir}", "fix or remove the tokenizer files")
    if tok is not None:
        # the run's own copy: what a config that pretrains or fine-tunes from this one should name
        sections["data"]["tokenizer"] = str(run_dir.resolve() / tokenizer.RUN_FOLDER)
        if tok.vocab_size > sections["model"]["vocab_size"]:
            raise ConfigError(
                f"--hf: the tokenizer has {tok.vocab_size} tokens, more than config.json vocab_size="
                f"{sections['model']['vocab_size']}"
            )
    sections["run"] = {"dir": str(run_dir)}
    cfg = configs.from_dict(configs.apply_overrides(sections, list(overrides)))
    params, buffers = _read_params(cfg, TensorReader(hf_dir))
    tmp = _staging(run_dir)
    try:
        write_run(cfg, tok, params, buffers, tmp)
        if run_dir.exists():
            run_dir.rmdir()
        tmp.rename(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_dir


def _staging(final: Path) -> Path:
    """A new folder beside `final` (same file system, so renaming it into place is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp
