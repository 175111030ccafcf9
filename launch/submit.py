"""`podtrain submit --target tpu-vm|gke|slurm|local`: start a run with the tools users already have.

Each target turns a Config into a `Submission`: files to write (the resolved job config, a
JobSet manifest, an sbatch script) and commands to run, as argument lists. `--dry-run` prints
them as the bash script that does exactly that; otherwise the files are written under
`.podtrain/<job>/` and the commands run in order. User strings never reach a shell unquoted:
commands are argument lists, shell text goes through `shlex.quote`, YAML through `yaml.safe_dump`,
and resource names (TPU VM, JobSet, SLURM job) are sanitized with `resource_name`.
"""

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from podtrain.train import config as configs
from podtrain.train.config import Config, ConfigError

TARGETS = ("tpu-vm", "gke", "slurm", "local")
STAGE_ROOT = Path(".podtrain")
JOB_CONFIG = "job.yaml"
HEREDOC = "PODTRAIN_EOF"
# What a worker needs of this checkout to `pip install` podtrain.
SOURCES = ("pyproject.toml", "README.md", "podtrain", "model", "parallel", "data", "train", "inference", "interop", "plan", "launch", "configs")


class ToolMissing(ConfigError):
    """The submission tool (gcloud, kubectl, sbatch) is not installed here."""


def resource_name(name: str, max_len: int = 40) -> str:
    """A name valid as a Kubernetes DNS-1035 label, GCE resource and SLURM job name.

    Lower-case letters, digits and '-', starting with a letter, ending with a letter or digit,
    at most `max_len` characters (JobSet derives pod host names of up to 63 from it).
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = "job-" + slug
    return slug[:max_len].rstrip("-")


@dataclasses.dataclass(frozen=True)
class Submission:
    files: dict[Path, str]  # written before the commands run
    commands: list[list[str]]
    tool: str  # the executable every command needs

    def script(self) -> str:
        """The bash script that does exactly what `run` does."""
        lines = ["#!/usr/bin/env bash", "set -euo pipefail"]
        for path, text in self.files.items():
            if any(line == HEREDOC for line in text.splitlines()):
                raise ValueError(f"{path} contains the line {HEREDOC}")
            lines += [f"mkdir -p {shlex.quote(str(path.parent))}",
                      f"cat > {shlex.quote(str(path))} <<'{HEREDOC}'", text.rstrip("\n"), HEREDOC]
        lines += [shlex.join(cmd) for cmd in self.commands]
        return "\n".join(lines) + "\n"

    def run(self) -> int:
        if shutil.which(self.tool) is None:
            raise ToolMissing(f"{self.tool} is not installed or not on PATH: install it, or pass --dry-run to see the commands")
        for path, text in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for cmd in self.commands:
            print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
            code = subprocess.run(cmd).returncode
            if code:
                return code
        return 0


def stage_dir(cfg: Config) -> Path:
    return STAGE_ROOT / resource_name(cfg.launch.job_name)


def job_config(cfg: Config, tpu_slices: bool = False) -> str:
    """The resolved config every worker runs (overrides applied; on TPU slices, DCN degrees
    covering launch.num_slices)."""
    from podtrain.plan import topology

    return configs.dump(topology.with_slices(cfg, cfg.launch.num_slices) if tpu_slices else cfg)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def build(cfg: Config, target: str) -> Submission:
    if target == "tpu-vm":
        from podtrain.launch import tpu_vm

        return tpu_vm.submission(cfg, stage_dir(cfg))
    if target == "gke":
        from podtrain.launch import gke

        return gke.submission(cfg, stage_dir(cfg))
    if target == "slurm":
        from podtrain.launch import slurm

        return slurm.submission(cfg, stage_dir(cfg))
    if target == "local":
        return _local(cfg)
    raise ConfigError(f"--target={target!r} is not one of {', '.join(TARGETS)}")


def _local(cfg: Config) -> Submission:
    """`podtrain launch local`: processes on this machine, each with fake CPU devices."""
    path = stage_dir(cfg) / JOB_CONFIG
    cmd = [sys.executable, "-m", "podtrain.launch.cli", "launch", "local",
           "--processes", str(cfg.launch.local_processes),
           "--devices-per-process", str(cfg.launch.local_devices_per_process),
           "--", "pretrain", "--config", str(path)]
    return Submission({path: job_config(cfg)}, [cmd], tool=sys.executable)


def submit(cfg: Config, target: str, dry_run: bool = False, out=None) -> int:
    """Print (dry run) or run the submission of `cfg` to `target`; the exit code."""
    sub = build(cfg, target)
    if dry_run:
        (out or sys.stdout).write(sub.script())
        return 0
    return sub.run()
