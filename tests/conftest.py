"""Shared fixtures. Every test process sees 8 fake CPU devices; 1-device runs use mesh.devices=1."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from podtrain.train import config as configs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE_DIR = ROOT.parent / "shared" / "data" / "tinyshakespeare"


# The overrides every short training test starts from: a tiny model on tiny-shakespeare, 4 steps.
TINY = [
    "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=64",
    "data.seq_len=16", "data.eval_batches=2", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=1",
    "train.peak_flops=1e11", "run.progress=false",
]  # fmt: skip
TINY_STEPS = ["train.steps=4", "train.eval_every=2"]


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    if not (SHAKESPEARE_DIR / "input.txt").exists():
        pytest.fail(f"{SHAKESPEARE_DIR}/input.txt is missing: tests need ../shared beside the checkout")
    return SHAKESPEARE_DIR


def heldout_folder(folder: Path, shakespeare_dir: Path) -> Path:
    """Fine-tuning text: tiny-shakespeare's test split (never pretrained on: the last 5% of
    input.txt, as data/tiny_shakespeare.py splits it), cut 80/20 into train.txt and validation.txt."""
    text = (shakespeare_dir / "input.txt").read_text(encoding="utf-8")
    rest = text[int(len(text) * 0.9) :]
    test = rest[int(len(rest) * 0.5) :]
    folder.mkdir(parents=True, exist_ok=True)
    cut = int(len(test) * 0.8)
    (folder / "train.txt").write_text(test[:cut])
    (folder / "validation.txt").write_text(test[cut:])
    return folder


def heldout_data(folder: Path) -> list[str]:
    """The overrides that fine-tune on heldout_folder's files."""
    return [f"data.dataset={folder}/train.txt", f"data.validation={folder}/validation.txt"]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory, shakespeare_dir) -> Path:
    """tiny_shakespeare built once per test process as ArrayRecord, offline."""
    from podtrain.data import sources
    from podtrain.data.config import DataConfig

    path = tmp_path_factory.mktemp("tfds")
    sources.prepare("tiny_shakespeare", DataConfig(data_dir=str(path), manual_dir=str(shakespeare_dir)))
    return path


@pytest.fixture
def tiny_config(tmp_path, tfds_dir, shakespeare_dir):
    """Factory: a small, fast Config on 1 device writing into tmp_path; overrides as dotted strings."""

    def make(*overrides: str) -> configs.Config:
        base = [
            *TINY,
            *TINY_STEPS,
            "mesh.devices=1",
            f"data.data_dir={tfds_dir}",
            f"data.manual_dir={shakespeare_dir}",
            f"run.dir={tmp_path / 'run'}",
        ]
        return configs.load(None, base + list(overrides))

    return make
