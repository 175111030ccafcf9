"""SLURM GPU clusters: an sbatch script with one task per GPU, started with `srun`.

Every task runs `podtrain pretrain`; inside an `srun` step JAX's own SLURM detection
(`jax.distributed.initialize()` with no arguments) finds the coordinator (first node of the
allocation), the process count and id (SLURM_NTASKS, SLURM_PROCID) and gives each task the GPU
of its local id, so tasks are one per GPU.
"""

import re
import shlex
from pathlib import Path

from podtrain.launch.submission import JOB_CONFIG, Submission, job_config, resource_name
from podtrain.train.config import Config, ConfigError

# #SBATCH lines are read by sbatch, not a shell: only plain values go there.
PLAIN = {"slurm_partition": r"[A-Za-z0-9_.,-]*", "slurm_time": r"[0-9]+(-[0-9]+)?(:[0-9]+){0,2}"}


def _check(cfg: Config) -> None:
    for key, pattern in PLAIN.items():
        value = getattr(cfg.launch, key)
        if not re.fullmatch(pattern, value):
            raise ConfigError(f"launch.{key}={value!r} is not a valid SLURM value (allowed: {pattern})")


def script(cfg: Config, config_path: Path) -> str:
    _check(cfg)
    lc = cfg.launch
    name = resource_name(lc.job_name)
    directives = [
        f"--job-name={name}",
        f"--nodes={lc.slurm_nodes}",
        f"--ntasks-per-node={lc.slurm_gpus_per_node}",
        f"--gpus-per-node={lc.slurm_gpus_per_node}",
        f"--time={lc.slurm_time}",
        f"--output={name}-%j.out",
    ]
    if lc.slurm_partition:
        directives.append(f"--partition={lc.slurm_partition}")
    run = [
        "srun",
        "--kill-on-bad-exit=1",
        "python3",
        "-m",
        "podtrain.launch.cli",
        "pretrain",
        "--config",
        str(config_path),
    ]
    return (
        "\n".join(
            [
                "#!/usr/bin/env bash",
                *(f"#SBATCH {d}" for d in directives),
                "set -euo pipefail",
                f"export PODTRAIN_JOB_NAME={shlex.quote(lc.job_name)}",
                "export PODTRAIN_DISTRIBUTED=auto",
                shlex.join(run),
            ]
        )
        + "\n"
    )


def submission(cfg: Config, stage: Path) -> Submission:
    config_path = stage / JOB_CONFIG
    sbatch = stage / "job.sbatch"
    files = {config_path: job_config(cfg), sbatch: script(cfg, config_path.resolve())}
    return Submission(files, [["sbatch", str(sbatch)]], tool="sbatch")
