"""Joining a multi-process JAX job: `initialize()` reads the launcher's environment variables.

`launch local` (and later the TPU/SLURM/K8s launchers) set these for every process:

  PODTRAIN_COORDINATOR    host:port of process 0's coordinator service
  PODTRAIN_NUM_PROCESSES  number of processes in the job
  PODTRAIN_PROCESS_ID     this process's index, 0 .. NUM_PROCESSES - 1
  PODTRAIN_CPU_DEVICES    (CPU only) fake devices per process, e.g. 4
  PODTRAIN_HEARTBEAT_S    (optional) seconds without a heartbeat before a peer counts as dead

Without them (one process) `initialize()` does nothing. It must run before anything touches a
JAX backend: device counts and the distributed client are fixed when the backend starts.
"""

import dataclasses
import os

import jax

from podtrain.parallel import clusters

ENV_COORDINATOR = "PODTRAIN_COORDINATOR"
ENV_NUM_PROCESSES = "PODTRAIN_NUM_PROCESSES"
ENV_PROCESS_ID = "PODTRAIN_PROCESS_ID"
ENV_CPU_DEVICES = "PODTRAIN_CPU_DEVICES"
ENV_HEARTBEAT = "PODTRAIN_HEARTBEAT_S"

# A peer that stops heartbeating is declared dead after this long and every other process then
# fails with an error instead of waiting in a collective forever (jax's default is 100 s).
HEARTBEAT_TIMEOUT_S = 20
# How long a process waits for the others to show up at start and at exit.
INIT_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class Job:
    coordinator: str
    num_processes: int
    process_id: int
    cpu_devices: int = 0  # 0: leave the CPU device count alone
    heartbeat_s: int = HEARTBEAT_TIMEOUT_S

    def env(self) -> dict[str, str]:
        """The environment variables that make a process join this job as `process_id`."""
        env = {
            ENV_COORDINATOR: self.coordinator,
            ENV_NUM_PROCESSES: str(self.num_processes),
            ENV_PROCESS_ID: str(self.process_id),
            ENV_HEARTBEAT: str(self.heartbeat_s),
        }
        if self.cpu_devices:
            env[ENV_CPU_DEVICES] = str(self.cpu_devices)
        return env


def job_from_env(environ=os.environ) -> Job | None:
    """The job this process was launched into, or None when it runs alone."""
    if ENV_COORDINATOR not in environ:
        return None
    try:
        return Job(
            coordinator=environ[ENV_COORDINATOR],
            num_processes=int(environ[ENV_NUM_PROCESSES]),
            process_id=int(environ[ENV_PROCESS_ID]),
            cpu_devices=int(environ.get(ENV_CPU_DEVICES, 0)),
            heartbeat_s=int(environ.get(ENV_HEARTBEAT, HEARTBEAT_TIMEOUT_S)),
        )
    except (KeyError, ValueError) as e:
        raise RuntimeError(f"{ENV_COORDINATOR} is set but the launcher's other variables are not: {e}") from None


def initialize(environ=os.environ) -> bool:
    """Join the job described by the environment (idempotent). True when running multi-process."""
    job = job_from_env(environ)
    if job is None:  # SLURM, GKE TPU pods, TPU VMs: JAX's own cluster detection (parallel/clusters.py)
        return clusters.initialize(environ) is not None
    if job.cpu_devices:
        jax.config.update("jax_num_cpu_devices", job.cpu_devices)
    if job.num_processes <= 1 or jax.distributed.is_initialized():
        return job.num_processes > 1
    # gloo is jax 0.10's default for CPU collectives across processes; pinned so that a changed
    # default cannot silently turn cross-process collectives off.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=job.coordinator,
        num_processes=job.num_processes,
        process_id=job.process_id,
        initialization_timeout=INIT_TIMEOUT_S,
        heartbeat_timeout_seconds=job.heartbeat_s,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
    return True


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
