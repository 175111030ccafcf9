"""The real `podtrain` CLI in a subprocess: bad input is one stderr line naming the key, the value
and the fix, exit code 2, no traceback, and nothing on disk changes."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podtrain.inference import generate
from podtrain.train import config as configs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "shakespeare_char.yaml"


def podtrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "podtrain.launch.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`: path -> (size, mtime_ns, sha256); {} if absent."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, digest)
    return out


def assert_user_error(result: subprocess.CompletedProcess, command: str, *words: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr}"
    assert lines[0].startswith(f"podtrain {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def tiny_yaml(tiny_config, tmp_path) -> Path:
    """The tiny test config as a YAML file (run.dir in tmp_path/run)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(configs.dump(tiny_config()))
    return path


CONFIG_ERRORS = {
    "unknown key": (["model.d_modle=64"], ["model.d_modle", "did you mean model.d_model?"]),
    "wrong type": (["train.steps=ten"], ["train.steps='ten'", "expected int"]),
    "heads vs d_model": (["model.num_heads=3"], ["model.num_heads=3", "must divide", "model.d_model=32"]),
    "kv heads vs heads": (["model.num_kv_heads=3"], ["model.num_kv_heads=3", "must divide", "model.num_heads=4"]),
}


@pytest.mark.parametrize("overrides,words", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_config_errors(tiny_yaml, tmp_path, overrides, words):
    before = snapshot(tmp_path)
    result = podtrain("pretrain", "--config", str(tiny_yaml), *overrides, cwd=tmp_path)
    assert_user_error(result, "pretrain", *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "text,words",
    [(None, ["--config", "no such file"]), ("model: [1, 2\n", ["--config", "not valid YAML"])],
    ids=["missing file", "yaml syntax"],
)
def test_config_file_errors(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    before = snapshot(tmp_path)
    assert_user_error(podtrain("pretrain", "--config", str(path), cwd=tmp_path), "pretrain", str(path), *words)
    assert snapshot(tmp_path) == before


def test_usage_errors_exit_2_without_traceback(tmp_path):
    result = podtrain("pretrain", cwd=tmp_path)  # --config is required
    assert result.returncode == 2 and "--config" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_missing_dataset_offline_fails_fast_and_names_the_file(tiny_yaml, tmp_path):
    empty, data_dir = tmp_path / "empty", tmp_path / "fresh_tfds"
    empty.mkdir()
    before = snapshot(tmp_path)
    start = time.perf_counter()
    result = podtrain(
        "pretrain", "--config", str(tiny_yaml), f"data.manual_dir={empty}", f"data.data_dir={data_dir}", cwd=tmp_path
    )
    elapsed = time.perf_counter() - start
    assert_user_error(result, "pretrain", "input.txt", str(empty), "data.manual_dir=")
    # No run dir, no half-built dataset: data_dir holds at most the lock that serializes builds.
    after = snapshot(tmp_path)
    left = {path for path in after.keys() - before.keys() if path != data_dir.name}
    assert {Path(path).name for path in left} <= {".tiny_shakespeare.lock"}, left
    assert all(Path(path).parent.name == data_dir.name for path in left), left
    assert {k: v for k, v in after.items() if k in before} == before
    # One download attempt, not TFDS's 10 retries with back-off (> 200 s of sleeping offline);
    # the margin is for imports on a loaded machine.
    assert elapsed < 150, f"took {elapsed:.0f} s to report a missing file"


def test_real_run_then_sample_then_a_different_config_is_refused(tiny_yaml, tmp_path):
    """One real run (4 steps of the tiny config) serves three checks, so it is trained once."""
    result = podtrain("pretrain", "--config", str(tiny_yaml), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    last_val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.search(rf"val_loss {last_val:.4f}\b", last_line), last_line
    saved = configs.load(run / "config.yaml")
    assert saved == configs.replace(configs.load(tiny_yaml), model={"vocab_size": 128})  # 66 ids, rounded up

    # Greedy sampling through the CLI ≡ the same generation in-process from the restored params.
    result = podtrain(
        "sample", "--run", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    cfg, tok, graphdef, params = generate.load_run(run)
    prompt = tok.prompt("ROMEO:")
    new = generate.generate(graphdef, params, cfg.model, prompt, 8, cfg.data.seq_len, temperature=0, stop_id=tok.eos_id)
    assert result.stdout == "ROMEO:" + tok.decode(new) + "\n"

    before = snapshot(run)
    result = podtrain("sample", "--run", str(run), "--prompt", "ROMEO€", cwd=tmp_path)
    assert_user_error(result, "sample", "--prompt", "€")
    for kwargs, words in [
        ({"temperature": -1.0}, "--temperature=-1.0 must be >= 0"),
        ({"top_k": 129}, r"--top-k=129 must be in \[0, 128\]"),
        ({"max_new_tokens": -1}, "--max-new-tokens=-1 must be >= 0"),
    ]:
        with pytest.raises(configs.ConfigError, match=words):
            generate.sample_run(run, "ROMEO", **{"max_new_tokens": 3, **kwargs})

    result = podtrain("pretrain", "--config", str(tiny_yaml), "model.d_model=64", cwd=tmp_path)
    assert_user_error(result, "pretrain", f"run.dir={run}", "model.d_model: 32 -> 64", "new run.dir")
    assert snapshot(run) == before


def test_sample_from_a_missing_run(tmp_path):
    result = podtrain("sample", "--run", str(tmp_path / "nope"), cwd=tmp_path)
    assert_user_error(result, "sample", "--run", "nope", "config.yaml")
    assert not any(tmp_path.iterdir())
