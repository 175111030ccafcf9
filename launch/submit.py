"""`podtrain submit --target tpu-vm|gke|slurm|local`: start a run with the tools users already have.

Each target module turns a Config into a `Submission` (launch/submission.py) staged under
`.podtrain/<job>/`. `--dry-run` prints it as the bash script that does exactly what it would do;
otherwise its files are written and its commands run in order.
"""

import sys
from pathlib import Path

from podtrain.launch import gke, local, slurm, tpu_vm
from podtrain.launch.submission import Submission, resource_name
from podtrain.train import validate
from podtrain.train.config import Config, ConfigError

TARGETS = {"tpu-vm": tpu_vm, "gke": gke, "slurm": slurm, "local": local}
STAGE_ROOT = Path(".podtrain")


def stage_dir(cfg: Config) -> Path:
    return STAGE_ROOT / resource_name(cfg.launch.job_name)


def build(cfg: Config, target: str) -> Submission:
    if target not in TARGETS:
        raise ConfigError(f"--target={target!r} is not one of {', '.join(TARGETS)}")
    validate.check_degrees(cfg)
    return TARGETS[target].submission(cfg, stage_dir(cfg))


def submit(cfg: Config, target: str, dry_run: bool = False, out=None) -> int:
    """Print (dry run) or run the submission of `cfg` to `target`; the exit code."""
    sub = build(cfg, target)
    if dry_run:
        (out or sys.stdout).write(sub.script())
        return 0
    return sub.run()
