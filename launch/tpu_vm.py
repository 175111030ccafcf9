"""TPU VMs with `gcloud`: create the slice, copy podtrain and the job config to every worker,
install, and start `podtrain pretrain` on all workers at once.

One slice is a TPU VM (`gcloud compute tpus tpu-vm create --version=...`, which returns once the
VM is up); several slices are a queued resource with `--node-count` (`gcloud compute tpus
queued-resources create --runtime-version=...`, the GA command group: no alpha component to
install), whose nodes gcloud joins over DCN and addresses together with `--node=all`. A queued
resource is only a request when `create` returns: the script polls `describe` until its state is
ACTIVE (and stops on FAILED or SUSPENDED) before it copies anything. Flags follow the gcloud
reference pages of each command (tests/test_submit.py holds the documented flag sets).

Each worker finds its peers itself: `PODTRAIN_DISTRIBUTED=auto` makes `podtrain pretrain` call
`jax.distributed.initialize()` with JAX's own detection of Cloud TPU VMs (worker list and slice
ids from the TPU metadata).
"""

import shlex
from pathlib import Path

from podtrain.launch.submission import JOB_CONFIG, SOURCES, Submission, job_config, repo_root, resource_name
from podtrain.plan import topology
from podtrain.train.config import Config

REMOTE_DIR = "podtrain"  # under the worker's home directory
POLL_S = 30  # seconds between queued-resource state checks


def _where(cfg: Config) -> list[str]:
    flags = []
    if cfg.launch.zone:
        flags.append(f"--zone={cfg.launch.zone}")
    if cfg.launch.project:
        flags.append(f"--project={cfg.launch.project}")
    return flags


def worker_command(cfg: Config) -> str:
    """The shell command every worker runs (no user string is left unquoted)."""
    return " && ".join(
        [
            f"cd {REMOTE_DIR}",
            "python3 -m pip install -q -e '.[tpu]'",
            f"PODTRAIN_DISTRIBUTED=auto PODTRAIN_JOB_NAME={shlex.quote(cfg.launch.job_name)} "
            f"python3 -m podtrain.launch.cli pretrain --config {shlex.quote(JOB_CONFIG)}",
        ]
    )


def wait_until_active(group: list[str], name: str, where: list[str]) -> list[str]:
    """A command that returns once the queued resource is ACTIVE, failing if it cannot become so."""
    describe = shlex.join([*group, "describe", name, *where, "--format=value(state.state)"])
    return [
        "bash",
        "-c",
        (
            f'until state=$({describe}) && [ "$state" = ACTIVE ]; do '
            f'case "$state" in FAILED|SUSPENDING|SUSPENDED) echo "queued resource {name}: $state" >&2; exit 1;; esac; '
            f'echo "queued resource {name}: ${{state:-unknown}}, waiting" >&2; sleep {POLL_S}; done'
        ),
    ]


def submission(cfg: Config, stage: Path) -> Submission:
    sl = topology.parse(cfg.launch.tpu_type, "launch.tpu_type")
    name = resource_name(cfg.launch.job_name)
    where = _where(cfg)
    config_file = stage / JOB_CONFIG
    sources = [str(repo_root() / s) for s in SOURCES] + [str(config_file)]
    if cfg.launch.num_slices == 1:
        group = ["gcloud", "compute", "tpus", "tpu-vm"]
        create = [
            *group,
            "create",
            name,
            f"--accelerator-type={sl.accelerator_type}",
            f"--version={cfg.launch.runtime_version}",
            *where,
        ]
        workers, wait = ["--worker=all"], []
    else:
        group = ["gcloud", "compute", "tpus", "queued-resources"]
        create = [
            *group,
            "create",
            name,
            f"--node-count={cfg.launch.num_slices}",
            f"--node-prefix={name}",
            f"--accelerator-type={sl.accelerator_type}",
            f"--runtime-version={cfg.launch.runtime_version}",
            *where,
        ]
        workers, wait = ["--worker=all", "--node=all"], [wait_until_active(group, name, where)]
    commands = [
        create,
        *wait,
        [*group, "ssh", name, *workers, *where, f"--command=mkdir -p {REMOTE_DIR}"],
        [*group, "scp", "--recurse", *sources, f"{name}:{REMOTE_DIR}/", *workers, *where],
        [*group, "ssh", name, *workers, *where, f"--command={worker_command(cfg)}"],
    ]
    return Submission({config_file: job_config(cfg, tpu_slices=True)}, commands, tool="gcloud")
