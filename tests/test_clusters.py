"""Cluster detection for `jax.distributed`: which environment started this process."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from podtrain.parallel import clusters

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "env, kind",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # an allocation, but not inside an srun step
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16"}, "slurm"),
        ({"TPU_WORKER_ID": "3", "TPU_WORKER_HOSTNAMES": "a,b,c,d"}, "gke-tpu"),
        ({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "localhost"}, None),  # single-host slice
        ({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "a", "MEGASCALE_COORDINATOR_ADDRESS": "x"}, "gke-tpu"),
        ({"PODTRAIN_DISTRIBUTED": "auto"}, "auto"),
        ({"PODTRAIN_COORDINATOR": "h:1", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, None),
    ],
)
def test_detect(env, kind):
    assert clusters.detect(env) == kind


@pytest.mark.slow
def test_two_slurm_tasks_join_one_job_through_jax_detection():
    """Two processes with the variables srun sets: JAX's SLURM detection makes them one job."""
    code = (
        "import jax; from parallel import clusters; k = clusters.initialize(); "
        "print(k, jax.process_index(), jax.process_count(), flush=True); jax.distributed.shutdown()"
    )
    job = str(random.randrange(10**6))  # JAX derives the coordinator port from the job id
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "SLURM_JOB_ID": job,
            "SLURM_STEP_ID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NODELIST": "localhost",
        }
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True))
    outs = sorted(p.communicate(timeout=180)[0].split()[-3:] for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [["slurm", "0", "2"], ["slurm", "1", "2"]]
