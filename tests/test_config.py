"""Config loading: shipped files load, dump → load round-trips, bad input is one clear ConfigError."""

import dataclasses
from pathlib import Path

import pytest

from podtrain.data import tokenizer
from podtrain.train import config as configs
from podtrain.train import loop
from podtrain.train.config import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS, "configs/*.yaml found nothing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = configs.load(path)
    again = tmp_path / "again.yaml"
    again.write_text(configs.dump(cfg))
    assert configs.load(again) == cfg


def test_shakespeare_char_is_nanogpts_baby_gpt_shape():
    cfg = configs.load(CONFIGS[0].parent / "shakespeare_char.yaml")
    m = cfg.model
    assert (m.num_layers, m.num_heads, m.d_model) == (4, 4, 128)
    assert (cfg.data.seq_len, cfg.train.batch_size, cfg.train.steps) == (64, 12, 2000)
    assert (cfg.data.dataset, cfg.data.tokenizer) == ("tiny_shakespeare", "char")


def _every_float_and_bool_changed(cls=configs.Config, prefix: str = "") -> list[str]:
    """Overrides giving every float and bool field of every section (nested ones too) a non-default value."""
    out = []
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        if dataclasses.is_dataclass(field.type):
            out += _every_float_and_bool_changed(field.type, key + ".")
        elif field.type is bool:
            out.append(f"{key}={str(not field.default).lower()}")
        elif field.type is float:
            out.append(f"{key}={field.default * 0.5 + 1e-4!r}")
    return out


def test_round_trip_with_non_default_values(tmp_path):
    # A value of every kind YAML might mangle: floats in exponent form, bools, strings, ints.
    overrides = _every_float_and_bool_changed() + [
        "model.num_layers=3",
        "model.d_model=96",
        "model.num_heads=6",
        "model.num_kv_heads=3",
        "model.head_dim=8",
        "model.vocab_size=300",
        "model.dtype=bfloat16",
        "model.scan_layers=scan",
        "model.remat=dots",
        "data.tokenizer=byte",
        "data.seq_len=33",
        "data.data_dir=/tmp/some where",
        "data.manual_dir=~/x:y",
        "train.lr=3e-4",
        "train.min_lr=1e-5",
        "train.steps=7",
        "train.seed=12",
        "mesh.data=2",
        "mesh.fsdp=-1",
        "mesh.devices=4",
        "run.dir=runs/a b",
        "checkpoint.keep=1",
    ]
    cfg = configs.load(None, overrides)
    assert cfg != configs.Config()
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    path = tmp_path / "c.yaml"
    path.write_text(configs.dump(cfg))
    assert configs.load(path) == cfg


def test_run_dir_config_yaml_reloads_equal(tmp_path):
    cfg = configs.load(None, [f"run.dir={tmp_path / 'run'}", "model.vocab_size=5", "train.lr=2e-3"])
    run = loop.prepare_run_dir(cfg, tokenizer.CharTokenizer("abcde"))
    assert configs.load(run / "config.yaml") == cfg


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n  num_heads: 2\ntrain:\n  lr: 1.0e-2\n")
    cfg = configs.load(path, ["model.num_heads=4", "train.steps=9"])
    assert (cfg.model.d_model, cfg.model.num_heads, cfg.train.lr, cfg.train.steps) == (64, 4, 1e-2, 9)


BAD = {
    # overrides -> words the one-line message must contain
    "unknown key": (["model.d_modle=64"], ["model.d_modle", "did you mean model.d_model?"]),
    "unknown section": (["modle.d_model=64"], ["modle", "did you mean model?"]),
    "str for int": (["train.steps=ten"], ["train.steps='ten'", "expected int"]),
    "float for int": (["model.d_model=12.5"], ["model.d_model=12.5", "expected int"]),
    "bool for int": (["model.d_model=true"], ["model.d_model=True", "expected int"]),
    "bool for float": (["train.lr=yes"], ["train.lr=True", "expected float"]),
    "list for float": (["train.lr=[1]"], ["train.lr=[1]", "expected float"]),
    "null for int": (["data.seq_len=null"], ["data.seq_len=None", "expected int"]),
    "int for bool": (["model.tie_embeddings=1"], ["model.tie_embeddings=1", "expected bool"]),
    "heads vs d_model": (["model.d_model=128", "model.num_heads=5"], ["model.num_heads=5", "model.d_model=128"]),
    "kv heads vs heads": (["model.num_heads=4", "model.num_kv_heads=3"], ["model.num_kv_heads=3", "model.num_heads=4"]),
    "bad choice": (["model.remat=some"], ["model.remat='some'", "full"]),
    "attention blocks vs seq_len": (["model.attention_blocks=3"], ["model.attention_blocks=3", "data.seq_len=64"]),
    "negative attention blocks": (["model.attention_blocks=-1"], ["model.attention_blocks=-1", "0: auto"]),
    "section as value": (["model=3"], ["model=3", "mapping"]),
    "value as section": (["model.d_model.x=1"], ["model.d_model=", "expected int"]),
    "no equals sign": (["model.d_model"], ["model.d_model", "key.sub=value"]),
    "empty run dir": (["run.dir="], ["run.dir=''"]),
    "moe as a section of its own": (["moe.num_experts=8"], ["unknown config key moe", "model.moe.num_experts=8"]),
}


@pytest.mark.parametrize("overrides,words", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_naming_key_and_value(overrides, words):
    with pytest.raises(ConfigError) as err:
        configs.load(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_a_top_level_moe_section_says_where_it_lives(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  d_model: 64\nmoe:\n  num_experts: 8\n")
    with pytest.raises(ConfigError) as err:
        configs.load(path)
    assert str(err.value) == "unknown config key moe: the MoE section lives in model.moe (e.g. model.moe.num_experts=8)"


def test_moe_nests_in_the_model_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 3\n  moe:\n    num_experts: 4\n    first_dense_layers: 1\n")
    cfg = configs.load(path, ["model.moe.top_k=1"])
    assert (cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.model.num_moe_layers) == (4, 1, 2)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        configs.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text", ["model: [1, 2\n", "model:\n  d_model: 1\n bad\n", b"\xff\xfe\x00"], ids=["flow", "indent", "binary"]
)
def test_unparseable_config_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        configs.load(path)
    assert "\n" not in str(err.value)


def test_run_dir_of_another_config_is_refused_and_left_alone(tmp_path):
    tok = tokenizer.CharTokenizer("abcde")
    run = loop.prepare_run_dir(configs.load(None, [f"run.dir={tmp_path}/run", "model.vocab_size=5"]), tok)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # tokenizer/ too
    other = configs.load(None, [f"run.dir={tmp_path}/run", "model.vocab_size=5", "model.d_model=64"])
    with pytest.raises(ConfigError, match=r"model\.d_model: 128 -> 64"):
        loop.prepare_run_dir(other, tok)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_non_run_dir_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a podtrain run"):
        loop.prepare_run_dir(
            configs.load(None, [f"run.dir={tmp_path}", "model.vocab_size=5"]), tokenizer.ByteTokenizer()
        )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
