"""`podtrain submit`: generated JobSet / sbatch / gcloud commands, checked field by field and run
against stand-in tools; hostile job names must come out inert."""

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from podtrain.launch import cli, gke, submission, tpu_vm
from podtrain.launch import submit as submits
from podtrain.plan import topology
from podtrain.train import config as configs

from conftest import TINY, TINY_STEPS

ROOT = Path(__file__).resolve().parent.parent
EVIL = """my "job" 'x' $(touch PWNED) `touch PWNED2`; touch PWNED3 && echo $HOME"""
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _cfg(*overrides):
    base = ["launch.tpu_type=v5p-256", "launch.image=example.com/podtrain:1", "model.vocab_size=256"]
    return configs.load(ROOT / "configs" / "shakespeare_char.yaml", base + list(overrides))


def _with_name(cfg, name):
    return configs.replace(cfg, launch={"job_name": name})


def _fake_tool(bin_dir: Path, name: str, log: Path) -> None:
    """An executable `name` that appends its argv to `log`: NUL after each argument, then a newline + NUL."""
    tool = bin_dir / name
    tool.write_text(
        f'#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\0" "$a" >> {shlex.quote(str(log))}; done\n'
        f'printf "\\n\\0" >> {shlex.quote(str(log))}\n'
    )
    tool.chmod(0o755)


def _calls(log: Path) -> list[list[str]]:
    calls, cur = [], []
    for arg in log.read_text().split("\0")[:-1]:
        if arg == "\n":
            calls.append(cur)
            cur = []
        else:
            cur.append(arg)
    return calls


@pytest.mark.parametrize("name", [EVIL, "Llama 3 8B!", "123abc", "---", "A" * 100, "ok-name"])
def test_resource_names_are_valid_dns_1035_labels(name):
    slug = submission.resource_name(name)
    assert DNS_1035.fullmatch(slug) and len(slug) <= 40, slug


def test_topology_names():
    sl = topology.parse("v5p-256")
    assert (sl.shape, sl.chips, sl.hosts, sl.accelerator_type, sl.gke_accelerator) == (
        (4, 4, 8),
        128,
        32,
        "v5p-256",
        "tpu-v5p-slice",
    )
    assert topology.parse("v5litepod-16").libtpu_name == "v5e:4x4"
    assert topology.parse("v6e-8").hosts == 1
    for bad in ("v5p-100", "h100-8", "v5p:4x4"):
        with pytest.raises(configs.ConfigError, match="--topology"):
            topology.parse(bad)


def test_jobset_fields():
    cfg = _with_name(_cfg("launch.num_slices=2", "launch.namespace=team-a"), EVIL)
    config_map, jobset = yaml.safe_load_all(yaml.safe_dump_all(gke.manifests(cfg)))
    name = submission.resource_name(EVIL)
    assert DNS_1035.fullmatch(jobset["metadata"]["name"]) and jobset["metadata"]["name"] == name
    assert jobset["metadata"]["namespace"] == "team-a"
    assert jobset["metadata"]["annotations"]["podtrain/job-name"] == EVIL  # survives YAML verbatim
    [rjob] = jobset["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 32 and job["completionMode"] == "Indexed"
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "4x4x8",
    }
    [container] = pod["containers"]
    assert container["image"] == "example.com/podtrain:1"
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["PODTRAIN_COORDINATOR"] == f"{name}-slice-0-0.{name}:{gke.COORDINATOR_PORT}"
    assert env["PODTRAIN_NUM_PROCESSES"] == "64"
    assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_COORDINATOR_ADDRESS"] == f"{name}-slice-0-0.{name}"
    assert env["PODTRAIN_JOB_NAME"] == EVIL
    # the mounted config is the run's config, with the slices joined over DCN
    shipped = configs.from_dict(yaml.safe_load(config_map["data"][submission.JOB_CONFIG]))
    assert shipped == configs.replace(cfg, mesh={"dcn_data": 2})
    assert pod["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]


def test_jobset_process_ids(tmp_path):
    """Run the container command with a stand-in `podtrain`: slice 1, host 3 of 32 -> process 35."""
    _, jobset = gke.manifests(_cfg("launch.num_slices=2"))
    container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "podtrain"
    fake.write_text('#!/usr/bin/env bash\necho "$PODTRAIN_PROCESS_ID $*"\n')
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "PODTRAIN_SLICE_INDEX": "1",
        "PODTRAIN_HOST_INDEX": "3",
    }
    out = subprocess.run(container["command"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["35", "pretrain", "--config", f"{gke.CONFIG_DIR}/{submission.JOB_CONFIG}"]


def test_sbatch_script_fields_and_inert_name(tmp_path):
    cfg = _with_name(
        _cfg(
            "launch.slurm_nodes=4",
            "launch.slurm_gpus_per_node=8",
            "launch.slurm_partition=gpu_h100",
            "launch.slurm_time=2-00:00:00",
        ),
        EVIL,
    )
    sub = submits.build(cfg, "slurm")
    [sbatch_path] = [p for p in sub.files if p.suffix == ".sbatch"]
    text = sub.files[sbatch_path]
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH")
    )
    assert directives == {
        "job-name": submission.resource_name(EVIL),
        "nodes": "4",
        "ntasks-per-node": "8",
        "gpus-per-node": "8",
        "time": "2-00:00:00",
        "output": f"{submission.resource_name(EVIL)}-%j.out",
        "partition": "gpu_h100",
    }
    assert sub.commands == [["sbatch", str(sbatch_path)]]
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    # Run the script itself with a stand-in srun: the name arrives verbatim and runs nothing.
    log = tmp_path / "calls"
    _fake_tool(tmp_path, "srun", log)
    script = tmp_path / "job.sbatch"
    script.write_text(text.replace("srun ", 'printf "%s" "$PODTRAIN_JOB_NAME" > name.txt; srun ', 1))
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "name.txt").read_text() == EVIL
    assert not list(tmp_path.glob("PWNED*"))
    [call] = _calls(log)
    assert call[call.index("--config") + 1] == str((submits.stage_dir(cfg) / submission.JOB_CONFIG).resolve())
    assert call[:5] == ["--kill-on-bad-exit=1", "python3", "-m", "podtrain.launch.cli", "pretrain"]


def test_sbatch_rejects_values_sbatch_would_misread():
    with pytest.raises(configs.ConfigError, match="launch.slurm_partition"):
        submits.build(_cfg("launch.slurm_partition=gpu; rm"), "slurm")


# From the gcloud reference pages (cloud.google.com/sdk/gcloud/reference/compute/tpus/...): each
# command's positional arguments and the flags it documents (of those we could use), the flags it
# requires, and the values we need. tpu-vm create takes --version; queued-resources create takes
# --runtime-version; only queued-resources ssh/scp take --node.
WHERE = {"--zone", "--project"}
GCLOUD = {
    ("compute", "tpus", "tpu-vm", "create"): (1, WHERE | {"--accelerator-type", "--version"}, {"--version"}),
    ("compute", "tpus", "tpu-vm", "ssh"): (1, WHERE | {"--worker", "--command"}, set()),
    ("compute", "tpus", "tpu-vm", "scp"): (None, WHERE | {"--worker", "--recurse"}, set()),
    ("compute", "tpus", "queued-resources", "create"): (
        1,
        WHERE | {"--accelerator-type", "--runtime-version", "--node-count", "--node-prefix"},
        {"--runtime-version", "--node-count"},
    ),
    ("compute", "tpus", "queued-resources", "describe"): (1, WHERE | {"--format"}, set()),
    ("compute", "tpus", "queued-resources", "ssh"): (1, WHERE | {"--worker", "--node", "--command"}, set()),
    ("compute", "tpus", "queued-resources", "scp"): (None, WHERE | {"--worker", "--node", "--recurse"}, set()),
}


def _check_documented(argv: list[str]) -> tuple[tuple[str, ...], dict[str, str | None]]:
    """(command path, flags) of a gcloud argv, asserting it uses only documented flags and positionals."""
    assert argv[0] == "gcloud"
    path = tuple(argv[1:5])
    assert path in GCLOUD, f"undocumented command: gcloud {' '.join(path)}"
    positionals, allowed, required = GCLOUD[path]
    flags = dict((a.split("=", 1) + [None])[:2] for a in argv[5:] if a.startswith("--"))
    args = [a for a in argv[5:] if not a.startswith("--")]
    assert set(flags) <= allowed, f"gcloud {' '.join(path)}: undocumented {set(flags) - allowed}"
    assert required <= set(flags), f"gcloud {' '.join(path)}: missing {required - set(flags)}"
    assert positionals is None or len(args) == positionals, argv
    return path, flags


def _fake_gcloud(bin_dir: Path, log: Path) -> None:
    """A gcloud that logs its argv like `_fake_tool` and answers `describe` with an ACTIVE state."""
    _fake_tool(bin_dir, "gcloud", log)
    tool = bin_dir / "gcloud"
    tool.write_text(tool.read_text() + 'case " $* " in *" describe "*) echo ACTIVE;; esac\n')


@pytest.mark.parametrize("slices", [1, 2])
def test_tpu_vm_dry_run_is_the_script_that_runs(tmp_path, slices):
    """The dry-run script, run with a stand-in gcloud, writes the job config and calls gcloud with
    exactly the submission's commands, each in its documented syntax; the remote command keeps
    the job name inert."""
    cfg = _with_name(_cfg(f"launch.num_slices={slices}", "launch.zone=us-east5-a", "launch.project=p"), EVIL)
    sub = submits.build(cfg, "tpu-vm")
    script = sub.script()
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    log = tmp_path / "calls"
    _fake_gcloud(tmp_path, log)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, check=True)
    calls = [["gcloud", *c] for c in _calls(log)]
    describes = [c for c in calls if c[4] == "describe"]
    assert [c for c in calls if c not in describes] == [c for c in sub.commands if c[0] == "gcloud"]
    written = (tmp_path / submits.stage_dir(cfg) / submission.JOB_CONFIG).read_text()
    assert written == submission.job_config(cfg, tpu_slices=True)

    name = submission.resource_name(EVIL)
    group = "tpu-vm" if slices == 1 else "queued-resources"
    steps = [_check_documented(c) for c in calls]
    assert [p[3] for p, _ in steps] == ["create", *["describe"] * (slices > 1), "ssh", "scp", "ssh"]
    assert {p[2] for p, _ in steps} == {group}
    (_, create), *_, (_, run) = steps
    assert calls[0][5] == name and create["--accelerator-type"] == "v5p-256" and create["--zone"] == "us-east5-a"
    assert create.get("--node-count") == (None if slices == 1 else "2")
    for path, flags in steps:
        if path[3] in ("ssh", "scp"):  # every worker of every slice
            assert flags["--worker"] == "all" and flags.get("--node") == (None if slices == 1 else "all")
    scp = next(c for c in calls if c[4] == "scp")
    assert f"{name}:{tpu_vm.REMOTE_DIR}/" in scp and "--recurse" in scp
    remote = run["--command"]
    assert remote == tpu_vm.worker_command(cfg)
    # On a worker: with stand-in pip/python3 the name reaches the environment verbatim, inertly.
    (tmp_path / tpu_vm.REMOTE_DIR).mkdir()
    py = tmp_path / "python3"
    py.write_text('#!/usr/bin/env bash\n[ "$2" = pip ] && exit 0\nprintf "%s" "$PODTRAIN_JOB_NAME" > name.txt\n')
    py.chmod(0o755)
    subprocess.run(["bash", "-c", remote], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / tpu_vm.REMOTE_DIR / "name.txt").read_text() == EVIL
    assert not list(tmp_path.rglob("PWNED*"))


def test_tpu_vm_workers_get_every_package_folder():
    """What a worker installs from: every folder pyproject.toml maps into the package, the build
    files, the shipped configs; each one exists in this checkout."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    assert folders | {"pyproject.toml", "README.md", "configs"} == set(submission.SOURCES)
    assert all((submission.repo_root() / s).exists() for s in submission.SOURCES)


@pytest.mark.parametrize("state, code", [("FAILED", 1), ("ACTIVE", 0)])
def test_queued_resource_wait_stops_on_failure(tmp_path, state, code):
    """Multi-slice: nothing is copied until the queued resource is ACTIVE; a FAILED one stops the script."""
    cfg = _cfg("launch.num_slices=2", "launch.zone=us-east5-a")
    name = submission.resource_name(cfg.launch.job_name)
    wait = tpu_vm.wait_until_active(["gcloud", "compute", "tpus", "queued-resources"], name, ["--zone=us-east5-a"])
    assert submits.build(cfg, "tpu-vm").commands[1] == wait  # right after create
    (tmp_path / "gcloud").write_text(f"#!/usr/bin/env bash\necho {state}\n")
    (tmp_path / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run(wait, env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == code and (state in done.stderr) == (code == 1)


def test_gke_dry_run_script_writes_the_manifest(tmp_path):
    cfg = _with_name(_cfg(), EVIL)
    sub = submits.build(cfg, "gke")
    log = tmp_path / "calls"
    _fake_tool(tmp_path, "kubectl", log)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", sub.script()], cwd=tmp_path, env=env, check=True)
    [call] = _calls(log)
    assert call[:2] == ["apply", "-f"]
    docs = list(yaml.safe_load_all((tmp_path / call[2]).read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "JobSet"]
    assert docs == gke.manifests(cfg)


def test_missing_tool_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud, kubectl or sbatch here
    config = ROOT / "configs" / "shakespeare_char.yaml"
    for target, tool in (("tpu-vm", "gcloud"), ("gke", "kubectl"), ("slurm", "sbatch")):
        code = cli.main(["submit", "--target", target, "--config", str(config), "launch.image=x"])
        err = capsys.readouterr().err
        assert code == 2 and f"{tool} is not installed" in err and "--dry-run" in err, err
    assert not (tmp_path / submits.STAGE_ROOT).exists()  # nothing written when nothing can run


def test_gke_needs_an_image():
    with pytest.raises(configs.ConfigError, match="launch.image"):
        submits.build(_cfg("launch.image="), "gke")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_dry_run(path):
    cfg = configs.load(path, ["launch.image=example.com/podtrain:1"])
    for target in ("tpu-vm", "gke", "slurm"):
        script = submits.build(cfg, target).script()
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.slow
def test_submit_local_runs_a_two_process_training(tmp_path, monkeypatch, tfds_dir, shakespeare_dir, capfd):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        *TINY_STEPS,
        f"data.data_dir={tfds_dir}",
        f"data.manual_dir={shakespeare_dir}",
        f"run.dir={run_dir}",
        "launch.local_processes=2",
        "launch.local_devices_per_process=4",
        "launch.job_name=local two",
    ]
    code = cli.main(
        ["submit", "--target", "local", "--config", str(ROOT / "configs" / "shakespeare_char.yaml"), *overrides]
    )
    out = capfd.readouterr().out
    assert code == 0, out
    assert "[p0]" in out and "[p1]" in out
    rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 4
    assert (tmp_path / submits.STAGE_ROOT / "local-two" / submission.JOB_CONFIG).exists()


def test_an_expert_degree_that_does_not_divide_the_experts_is_refused_before_submitting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "shakespeare_moe.yaml"
    for target in ("tpu-vm", "gke", "slurm", "local"):
        code = cli.main(
            ["submit", "--target", target, "--config", str(config), "--dry-run", "launch.image=x", "mesh.expert=3"]
        )
        err = capsys.readouterr().err
        assert code == 2 and "model.moe.num_experts=8" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / submits.STAGE_ROOT).exists()
