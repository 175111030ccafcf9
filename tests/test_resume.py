"""Resumed ≡ uninterrupted, bit for bit: after SIGKILL at random moments and after SIGTERM.

The runs are `podtrain pretrain` subprocesses on one CPU device, saving every step so that kills
often land inside an asynchronous save. They read a file source (tiny-shakespeare's speeches as
JSONL files, documents held out for validation) tokenized in a Grain worker process, so the data
iterator state that is restored is the streaming pipeline's with workers.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from podtrain.train import checkpoint
from podtrain.train.preemption import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_dir) -> str:
    """A glob of three JSONL files holding tiny-shakespeare's speeches, one record each."""
    folder = tmp_path_factory.mktemp("corpus")
    speeches = (shakespeare_dir / "input.txt").read_text().split("\n\n")
    for i in range(3):
        lines = [json.dumps({"text": s}) for s in speeches[i::3]]
        (folder / f"part-{i}.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "part-*.jsonl")


def _write_config(path: Path, run_dir: Path, corpus: str) -> Path:
    cfg = {
        "model": {"num_layers": 2, "d_model": 64, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 128},
        "data": {"dataset": corpus, "holdout": 0.02, "workers": 1, "seq_len": 32, "eval_batches": 2},
        "train": {
            "steps": STEPS,
            "batch_size": 8,
            "eval_every": 10,
            "log_every": 1,
            "warmup_steps": 2,
            "peak_flops": 1e11,
        },
        "checkpoint": {"every": 1, "keep": 2},
        "mesh": {"devices": 1},
        "run": {"dir": str(run_dir), "progress": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "podtrain.launch.cli", "pretrain", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return rows[-1]["step"] if rows else 0


def _wait_for_step(proc, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _logged_steps(run_dir) < step:
        assert proc.poll() is None, f"run exited with {proc.returncode} before step {step}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout}s"
        time.sleep(0.02)


def _final_digest(run_dir: Path) -> str:
    rows = {r["step"]: r for r in checkpoint.listing(run_dir) if r["valid"]}
    assert STEPS in rows, f"no valid checkpoint of step {STEPS}: {sorted(rows)}"
    return rows[STEPS]["params_digest"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = _write_config(tmp / "cfg.yaml", tmp / "run", corpus)
    proc = _start(config, tmp / "log.txt")
    assert proc.wait(timeout=600) == 0, (tmp / "log.txt").read_text()[-3000:]
    return _final_digest(tmp / "run")


@pytest.mark.slow
def test_sigkill_three_times_then_resume_is_bitwise_identical(uninterrupted, tmp_path, corpus):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    config = _write_config(tmp_path / "cfg.yaml", run_dir, corpus)
    kills = []
    for target in sorted(rng.sample(range(2, STEPS - 2), 3)):
        proc = _start(config, log)
        _wait_for_step(proc, run_dir, target)
        time.sleep(rng.uniform(0, 0.05))  # somewhere in the next steps or the saves between them
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_logged_steps(run_dir))
    proc = _start(config, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    print(
        f"seed {seed}: SIGKILL after logged steps {kills}; on resume: "
        f"{text.count('leftover temporary folder')} leftover tmp folders, {text.count('is invalid')} invalid steps"
    )
    assert _final_digest(run_dir) == uninterrupted, f"seed {seed}, killed after logged steps {kills}"


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_143_and_resumes(uninterrupted, tmp_path, corpus):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    config = _write_config(tmp_path / "cfg.yaml", run_dir, corpus)
    proc = _start(config, log)
    _wait_for_step(proc, run_dir, 15)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT_CODE == 143, log.read_text()[-3000:]
    stopped = _logged_steps(run_dir)
    assert 15 <= stopped < STEPS
    newest = max(r["step"] for r in checkpoint.listing(run_dir) if r["valid"])
    assert newest == stopped, "the step it stopped at was not saved"
    assert f"preempted: saved step {stopped}" in log.read_text()

    proc = _start(config, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "the resumed run did not continue after the saved step"
    assert _final_digest(run_dir) == uninterrupted
