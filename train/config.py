"""The run configuration: one YAML file, dotted overrides, typed frozen dataclasses.

`load(path, overrides)` is the only entry point. Unknown keys are rejected with the closest valid
key, types are checked (dacite), and every field validates itself; all of these surface as
ConfigError, one line naming the key, the value and the fix.
"""

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import dacite
import yaml

from podtrain.data.config import DataConfig
from podtrain.model.config import ModelConfig, check, check_choice
from podtrain.parallel.config import MeshConfig


class ConfigError(ValueError):
    """Bad user input in a config file or override (reported in one line, exit code 2)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12  # global batch, in sequences
    grad_accum_steps: int = 1
    seed: int = 0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 0.0
    eval_every: int = 250
    log_every: int = 10
    peak_flops: float = 0.0  # per device, for MFU; 0: published figure, or measured on CPU
    max_bad_steps: int = 10  # consecutive non-finite steps (each skipped) before the run stops

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum_steps", "eval_every", "log_every", "max_bad_steps"):
            check(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be > 0")
        check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        check(0 <= self.min_lr <= self.lr, f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        check(
            self.batch_size % self.grad_accum_steps == 0,
            f"train.grad_accum_steps={self.grad_accum_steps} must divide train.batch_size={self.batch_size}",
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between (asynchronous) saves; the last step is always saved
    keep: int = 3

    def __post_init__(self):
        check(self.every > 0, f"checkpoint.every={self.every} must be > 0")
        check(self.keep > 0, f"checkpoint.keep={self.keep} must be > 0")


FINETUNE_MODES = ("full", "freeze", "lora")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """`podtrain finetune`: start from another run's parameters (train/finetune.py)."""

    init_from: str = ""  # RUN_DIR or RUN_DIR:STEP (default: its newest valid step)
    mode: str = "full"  # full | freeze (parameters matching `freeze` stay fixed) | lora
    freeze: str = ""  # regex searched in parameter paths like blocks/attn/wq, e.g. "^embed$|attn/"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "attn/w[qkvo]$|mlp/w_(gate|up|down)$"  # regex over parameter paths

    def __post_init__(self):
        check_choice("finetune.mode", self.mode, FINETUNE_MODES)
        check(self.lora_rank > 0, f"finetune.lora_rank={self.lora_rank} must be > 0")
        check(self.mode != "freeze" or self.freeze, "finetune.mode=freeze needs finetune.freeze=REGEX")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/shakespeare_char"
    progress: bool = True  # progress bar on stderr

    def __post_init__(self):
        check(self.dir.strip() != "", f"run.dir={self.dir!r} must name a directory, e.g. run.dir=runs/my_run")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Where `podtrain submit` sends the run (see launch/submit.py)."""

    job_name: str = "podtrain"
    tpu_type: str = "v5p-8"  # gcloud accelerator type (v5p-256, v5litepod-16, ...) or v5p:4x4x8
    num_slices: int = 1
    project: str = ""  # GCP project and zone (tpu-vm); empty: gcloud's configured defaults
    zone: str = ""
    runtime_version: str = "v2-alpha-tpuv5"  # TPU VM software image
    image: str = ""  # container image with podtrain installed (gke)
    namespace: str = "default"
    slurm_partition: str = ""
    slurm_nodes: int = 1
    slurm_gpus_per_node: int = 8
    slurm_time: str = "24:00:00"
    local_processes: int = 2
    local_devices_per_process: int = 4

    def __post_init__(self):
        check(self.job_name.strip() != "", "launch.job_name is empty: name the job")
        for name in (
            "num_slices",
            "slurm_nodes",
            "slurm_gpus_per_node",
            "local_processes",
            "local_devices_per_process",
        ):
            check(getattr(self, name) >= 1, f"launch.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    launch: LaunchConfig = LaunchConfig()

    def __post_init__(self):
        blocks = self.model.attention_blocks
        check(
            blocks == 0 or self.data.seq_len % blocks == 0,
            f"model.attention_blocks={blocks} must divide data.seq_len={self.data.seq_len} (or 0: auto)",
        )


def _number(field_type):
    """dacite type hook for int and float fields."""

    def hook(value):
        if isinstance(value, bool):  # an int subclass: `model.d_model=true` must not mean 1
            raise dacite.WrongTypeError(field_type=field_type, value=value)
        if field_type is float and isinstance(value, (int, str)):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string, and 3 as an int
            except ValueError:
                pass
        return value  # a wrong type fails dacite's type check, which names the field

    return hook


_DACITE = dacite.Config(strict=True, type_hooks={float: _number(float), int: _number(int)}, cast=[tuple])


# Keys that name a section which lives elsewhere: where it lives now.
MOVED = {"moe": "the MoE section lives in model.moe (e.g. model.moe.num_experts=8)"}


def _check_keys(cls, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={data!r} must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if prefix + str(key) in MOVED:
            raise ConfigError(f"unknown config key {prefix}{key}: {MOVED[prefix + str(key)]}")
        if key not in fields:
            valid = [prefix + name for name in fields]
            close = difflib.get_close_matches(prefix + str(key), valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key {prefix}{key}: {hint}")
        sub = typing.get_type_hints(cls)[key]
        if dataclasses.is_dataclass(sub):
            _check_keys(sub, value, f"{prefix}{key}.")
        elif typing.get_origin(sub) is tuple and dataclasses.is_dataclass(item := typing.get_args(sub)[0]):
            if not isinstance(value, list | tuple):
                raise ConfigError(f"{prefix}{key}={value!r} must be a list of {item.__name__} mappings")
            for i, entry in enumerate(value):  # data.mixture: a list of sections
                _check_keys(item, entry, f"{prefix}{key}[{i}].")


def _type_name(t) -> str:
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    return getattr(t, "__name__", str(t))


def from_dict(data: dict) -> Config:
    _check_keys(Config, data)
    try:
        return dacite.from_dict(Config, data, config=_DACITE)
    except dacite.WrongTypeError as e:
        raise ConfigError(
            f"{e.field_path}={e.value!r} has the wrong type: expected {_type_name(e.field_type)}"
        ) from None
    except dacite.DaciteError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:  # a field's own validation
        raise ConfigError(str(e)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` (value parsed as YAML) in a nested dict; returns a new dict."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(apply_overrides(data, list(overrides)))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat(data: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}, keys as overrides name them (model.moe.top_k)."""
    out = {}
    for key, value in data.items():
        out |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg, **sections):
    """Config with some sections' fields replaced, nested sections as dicts too:
    replace(cfg, model={'vocab_size': 65, 'moe': {'num_experts': 8}})."""
    return dataclasses.replace(
        cfg,
        **{
            name: replace(getattr(cfg, name), **value) if isinstance(value, dict) else value
            for name, value in sections.items()
        },
    )
