"""Restoring onto another mesh or process count gives the saved values exactly."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from podtrain.parallel import mesh as meshes
from podtrain.train import checkpoint, integrity, loop, optim
from podtrain.train import config as configs
from podtrain.train import state as states

ROOT = Path(__file__).resolve().parent.parent


def _two_processes(script: str, cfg, tmp_path) -> list[subprocess.Popen]:
    """`script` started as processes 0 and 1 of one JAX job on 127.0.0.1, argv: rank, port, config."""
    config = tmp_path / "cfg.yaml"
    config.write_text(configs.dump(cfg))
    port, env = _free_port(), {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", script]
    return [
        subprocess.Popen(
            [*cmd, str(i), str(port), str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


class _Iter:
    state = None

    def set_state(self, state):
        self.state = state


def _restore(cfg, run_dir):
    """The newest checkpoint of run_dir restored onto cfg's mesh (one process)."""
    cfg = loop.resolve(cfg, 65)
    lay = states.layout(cfg.model, optim.optimizer(cfg.train), meshes.build_mesh(cfg.mesh))
    data_iter = _Iter()
    ckpts = checkpoint.Checkpoints(run_dir, cfg.checkpoint)
    state = ckpts.resume(lay.abstract, data_iter)
    ckpts.close()
    return state, lay, data_iter


def _saved_streams(run_dir, step: int) -> dict:
    """Every process's saved stream positions of `step`, merged."""
    streams = {}
    for path in Path(run_dir, "checkpoints", str(step), "data").glob("process_*.json"):
        streams |= json.loads(path.read_text())["streams"]
    return {"streams": streams}


def test_fsdp8_restores_onto_data2_tensor4(tiny_config):
    saved_cfg = tiny_config("mesh.devices=8", "mesh.data=1", "mesh.fsdp=8", "checkpoint.every=2")
    saved = loop.pretrain(saved_cfg)["state"]
    assert "fsdp" in str(saved.params["blocks"]["mlp"]["w_up"].sharding.spec)

    new_cfg = configs.replace(saved_cfg, mesh={"data": 2, "fsdp": 1, "tensor": 4})
    state, lay, data_iter = _restore(new_cfg, saved_cfg.run.dir)
    assert int(state.step) == 4 and data_iter.state == _saved_streams(saved_cfg.run.dir, 4)
    for got, want, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(saved), jax.tree.leaves(lay.state)):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert "tensor" in str(state.params["blocks"]["mlp"]["w_up"].sharding.spec)
    assert integrity.tree_digest(state.params) == integrity.tree_digest(saved.params)
    # `podtrain checkpoints` (one device, host arrays) shows the same digest as the 8-way sharded state
    assert checkpoint.listing(saved_cfg.run.dir)[-1]["params_digest"] == integrity.tree_digest(saved.params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


TWO_PROCESS_RUN = textwrap.dedent("""
    import os, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
    from podtrain.train import config as configs, loop, integrity
    result = loop.pretrain(configs.load(sys.argv[3]))
    print("DIGEST", integrity.tree_digest(result["state"].params), result["val_loss"], flush=True)
""")


@pytest.mark.slow
def test_two_processes_restore_onto_one(tiny_config, tmp_path):
    """2 processes x 4 devices (fsdp=8) save; this one process (data=2 x tensor=4) restores."""
    cfg = tiny_config("mesh.devices=0", "mesh.data=1", "mesh.fsdp=8", "checkpoint.every=2")
    procs = _two_processes(TWO_PROCESS_RUN, cfg, tmp_path)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
    digests = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("DIGEST")}
    assert len(digests) == 1
    val_loss = float(outs[0].split("DIGEST")[1].split()[1])
    assert sorted(p.name for p in Path(cfg.run.dir, "checkpoints", "4", "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    new_cfg = configs.replace(cfg, mesh={"devices": 8, "data": 2, "fsdp": 1, "tensor": 4})
    state, _, data_iter = _restore(new_cfg, cfg.run.dir)
    assert integrity.tree_digest(state.params) == digests.pop()
    # one process reads both processes' streams: every row of the global batch, once
    assert int(state.step) == 4 and data_iter.state == _saved_streams(cfg.run.dir, 4)
    assert sorted(map(int, data_iter.state["streams"])) == list(range(cfg.train.batch_size))
    # the whole resume path on the new mesh and process count: nothing left to train, evaluate
    result = loop.pretrain(new_cfg)
    np.testing.assert_allclose(result["val_loss"], val_loss, rtol=1e-5)


MULTIHOST_SIGTERM_RUN = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
    from podtrain.train import config as configs, loop
    result = loop.pretrain(configs.load(sys.argv[3]))
    print("RESULT", result["preempted"], result["step"], flush=True)
""")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_config, tmp_path):
    """JAX's preemption sync point: SIGTERM to process 1 only; both save and stop at one step."""
    import json
    import signal
    import time

    cfg = tiny_config(
        "mesh.devices=0",
        "mesh.data=1",
        "mesh.fsdp=8",
        "train.steps=400",
        "train.eval_every=400",
        "checkpoint.every=1000",
    )
    procs = _two_processes(MULTIHOST_SIGTERM_RUN, cfg, tmp_path)
    metrics = Path(cfg.run.dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][-3000:]
    results = [line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2 and results[0] == results[1] and results[0][0] == "True", results
    stopped = int(results[0][1])
    assert 5 <= stopped < 400
    assert [r["step"] for r in checkpoint.listing(cfg.run.dir) if r["valid"]] == [stopped]
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == stopped
