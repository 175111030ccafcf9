"""What every submit target shares: the `Submission` it returns, the resource names it derives from
`launch.job_name`, the resolved job config it ships and the part of this checkout a worker installs.

A Submission is files to write (the resolved job config, a JobSet manifest, an sbatch script) and
commands to run, as argument lists. User strings never reach a shell unquoted: commands are
argument lists, shell text goes through `shlex.quote`, YAML through `yaml.safe_dump`, and resource
names (TPU VM, JobSet, SLURM job) are sanitized with `resource_name`.
"""

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from podtrain.plan import topology
from podtrain.train import config as configs
from podtrain.train.config import Config, ConfigError

JOB_CONFIG = "job.yaml"
HEREDOC = "PODTRAIN_EOF"
# What a worker needs of this checkout to `pip install` podtrain: pyproject.toml's package-dir folders.
SOURCES = (
    "pyproject.toml",
    "README.md",
    "podtrain",
    "model",
    "parallel",
    "data",
    "train",
    "inference",
    "interop",
    "plan",
    "launch",
    "configs",
)


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
            lines += [
                f"mkdir -p {shlex.quote(str(path.parent))}",
                f"cat > {shlex.quote(str(path))} <<'{HEREDOC}'",
                text.rstrip("\n"),
                HEREDOC,
            ]
        lines += [shlex.join(cmd) for cmd in self.commands]
        return "\n".join(lines) + "\n"

    def run(self) -> int:
        if shutil.which(self.tool) is None:
            raise ToolMissing(
                f"{self.tool} is not installed or not on PATH: install it, or pass --dry-run to see the commands"
            )
        for path, text in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for cmd in self.commands:
            print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
            code = subprocess.run(cmd).returncode
            if code:
                return code
        return 0


def job_config(cfg: Config, tpu_slices: bool = False) -> str:
    """The resolved config every worker runs (overrides applied; on TPU slices, DCN degrees
    covering launch.num_slices)."""
    return configs.dump(topology.with_slices(cfg, cfg.launch.num_slices) if tpu_slices else cfg)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
