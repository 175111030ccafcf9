"""Which cluster started this process, and joining its JAX job with JAX's own auto-detection.

JAX's `jax.distributed.initialize()` without arguments already knows SLURM (srun steps), Cloud TPU
VMs (metadata server, multi-slice MEGASCALE_* variables) and GKE TPU pods (TPU_WORKER_ID and
TPU_WORKER_HOSTNAMES, set by GKE's TPU webhook). It is called only when one of those is detected
here from environment variables alone, because on a laptop the Cloud TPU probe would query a
metadata server that is not there. Launchers that set PODTRAIN_COORDINATOR (`launch local`, the
GKE JobSet of launch/gke.py) are handled by parallel/distributed.py instead.
"""

import os

import jax

# Set by `podtrain submit` where JAX's detection needs the metadata server (TPU VMs).
ENV_AUTO = "PODTRAIN_DISTRIBUTED"


def detect(environ=os.environ) -> str | None:
    """'slurm', 'gke-tpu', 'auto' (PODTRAIN_DISTRIBUTED=auto: let JAX probe, e.g. on TPU VMs), or
    None when this process runs alone (or under podtrain's own launcher variables)."""
    if "PODTRAIN_COORDINATOR" in environ:  # parallel/distributed.py's own launcher variables
        return None
    if "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if "TPU_WORKER_ID" in environ and ("," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in environ):
        return "gke-tpu"
    if environ.get(ENV_AUTO) == "auto":
        return "auto"
    return None


def initialize(environ=os.environ) -> str | None:
    """Join the detected cluster's JAX job (once); returns what was detected."""
    kind = detect(environ)
    if kind is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    return kind
