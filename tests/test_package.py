"""The installed package: a wheel holds podtrain/... and nothing else, and trains from any directory."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, ROOT, cwd=out
    )
    assert built.returncode == 0, built.stderr
    [path] = out.glob("podtrain-*.whl")
    return path


def test_wheel_holds_only_the_podtrain_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"podtrain", wheel.name.split("-py3")[0] + ".dist-info"}, top
    rooms = {name.split("/")[1] for name in names if name.startswith("podtrain/") and name.count("/") == 2}
    assert rooms == {"model", "parallel", "data", "train", "inference", "interop", "plan", "launch"}
    assert "podtrain/__init__.py" in names and "podtrain/launch/cli.py" in names


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_from_outside_the_repo(wheel, tmp_path, tfds_dir, shakespeare_dir):
    """`pip install` of the wheel (not editable) into a new venv: `podtrain` works from another
    directory and the generic names are not importable. The venv borrows this one's third-party
    packages (a .pth line) instead of downloading them again; podtrain itself is only the wheel's."""
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    )
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    where = _run(python, "-c", "import podtrain.model; print(podtrain.model.__file__)", cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.startswith(str(site)), where
    for name in ("model", "parallel", "data", "train", "launch"):
        shadow = _run(python, "-c", f"import {name}", cwd=tmp_path)
        assert shadow.returncode != 0 and "ModuleNotFoundError" in shadow.stderr, (name, shadow.stdout)

    run = _run(
        venv / "bin" / "podtrain",
        "pretrain",
        "--config",
        ROOT / "configs" / "shakespeare_char.yaml",
        "train.steps=20",
        "train.eval_every=10",
        "data.eval_batches=2",
        "run.progress=false",
        "mesh.devices=1",
        f"data.data_dir={tfds_dir}",
        f"data.manual_dir={shakespeare_dir}",
        f"run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "final val_loss" in run.stdout and "at step 20" in run.stdout, run.stdout
