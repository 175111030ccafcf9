"""`launch local`: real processes on 127.0.0.1, one JAX job, ≡ one process with as many devices."""

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from podtrain.launch import cli, local
from podtrain.train import loop

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.num_layers=2",
    "model.d_model=64",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.mlp_dim=128",
    "data.seq_len=16",
    "data.eval_batches=2",
    "train.batch_size=16",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=2",
    "train.peak_flops=1e11",
    "run.progress=false",
]


def pretrain_args(run_dir, data_dir, shakespeare_dir, *overrides):
    return [
        "pretrain",
        "--config",
        str(ROOT / "configs" / "shakespeare_char.yaml"),
        *TINY,
        f"data.data_dir={data_dir}",
        f"data.manual_dir={shakespeare_dir}",
        f"run.dir={run_dir}",
        *overrides,
    ]


def rows(run_dir):
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process_of_eight_devices(tmp_path, tiny_config, shakespeare_dir):
    out = io.StringIO()
    # A fresh data dir: both processes find the dataset unbuilt and must not race building it.
    args = pretrain_args(tmp_path / "multi", tmp_path / "fresh_tfds", shakespeare_dir, "train.steps=4")
    assert local.launch(args, processes=2, devices_per_process=4, out=out) == 0, out.getvalue()[-3000:]
    lines = out.getvalue().splitlines()
    assert any(x.startswith("[p0] final val_loss") for x in lines) and any(x.startswith("[p1] final") for x in lines)

    reference = tiny_config(*TINY, "train.steps=4", "mesh.devices=0", f"run.dir={tmp_path / 'single'}")
    loop.pretrain(reference)  # this process: 8 fake devices
    multi, single = rows(tmp_path / "multi"), rows(tmp_path / "single")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [1, 2, 3, 4]
    for key in ("train_loss", "grad_norm", "val_loss"):
        got = [r[key] for r in multi if key in r]
        want = [r[key] for r in single if key in r]
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("watchdog", [True, False], ids=["launcher-stops-the-rest", "jax-heartbeat-alone"])
def test_a_dead_process_stops_the_job_within_60s(tmp_path, tfds_dir, shakespeare_dir, watchdog):
    out = io.StringIO()
    args = pretrain_args(tmp_path / "run", tfds_dir, shakespeare_dir, "train.steps=100000", "checkpoint.every=100000")
    job = local.LocalJob(args, processes=2, devices_per_process=2, out=out)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "run" / "metrics.jsonl").exists() or not rows(tmp_path / "run"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs), out.getvalue()[-3000:]
            time.sleep(0.5)
        os.kill(job.procs[1].pid, signal.SIGKILL)  # training is under way: kill process 1
        killed = time.monotonic()
        result = {}
        waiter = threading.Thread(target=lambda: result.setdefault("code", job.wait(stop_on_failure=watchdog)))
        waiter.start()
        waiter.join(timeout=90)
        assert not waiter.is_alive(), "the job still runs 90 s after a process died"
        elapsed = time.monotonic() - killed
        print(f"every process had exited {elapsed:.1f} s after process 1 was killed (watchdog={watchdog})")
        assert elapsed < 60
        assert result["code"] != 0
        assert all(p.poll() is not None for p in job.procs)
        if not watchdog:
            assert job.procs[0].returncode != 0  # process 0 noticed on its own
    finally:
        for p in job.procs:
            if p.poll() is None:
                p.kill()


def test_launcher_prefixes_output_and_returns_the_failure(tmp_path):
    out = io.StringIO()
    code = local.launch(["pretrain", "--config", str(tmp_path / "missing.yaml")], 2, 1, out=out)
    lines = out.getvalue().splitlines()
    assert code == 2
    error = f"podtrain pretrain: error: --config {tmp_path / 'missing.yaml'}: no such file"
    assert any(line in (f"[p0] {error}", f"[p1] {error}") for line in lines)  # the first to fail stops the other
    assert all(line.startswith(("[p0] ", "[p1] ", "[launch] ")) for line in lines)


def test_launch_local_cli_needs_a_command(capsys):
    assert cli.main(["launch", "local", "--processes", "2", "--"]) == 2
    assert "give the podtrain command" in capsys.readouterr().err
