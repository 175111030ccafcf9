"""Checkpoint integrity: every kind of damage is detected, warned about, and an older step is used."""

import json
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from podtrain.parallel import mesh as meshes
from podtrain.train import checkpoint, integrity, loop, optim
from podtrain.train import state as states
from podtrain.train.integrity import CorruptCheckpointWarning

from conftest import TINY, TINY_STEPS


def _layout(cfg):
    return states.layout(cfg.model, optim.optimizer(cfg.train), meshes.build_mesh(cfg.mesh))


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_data_file(step_dir)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _overwrite_64_bytes(step_dir):
    f = _largest_data_file(step_dir)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(255 - b for b in data[mid : mid + 64])
    f.write_bytes(bytes(data))


def _delete_file(step_dir):
    _largest_data_file(step_dir).unlink()


def _empty_folder(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _no_manifest(step_dir):  # committed by Orbax but never sealed: a half-written step
    (step_dir / integrity.MANIFEST).unlink()


def _leftover_tmp(step_dir):  # a save of a later step killed mid-write, beside an intact step
    tmp = step_dir.parent / f"{int(step_dir.name) + 2}.orbax-checkpoint-tmp"
    shutil.copytree(step_dir / "state", tmp / "state")
    _truncate(tmp)


DAMAGE = {
    "truncate": (_truncate, "bytes"),
    "overwrite_64_bytes": (_overwrite_64_bytes, "sha256 mismatch"),
    "delete_file": (_delete_file, "is missing"),
    "empty_step_folder": (_empty_folder, "empty step folder"),
    "half_written": (_no_manifest, "never completed"),
    "leftover_tmp": (_leftover_tmp, "leftover temporary folder"),
}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tfds_dir, shakespeare_dir):
    """A 4-step run with checkpoints at steps 2 and 4, and each step's parameter digest."""
    from podtrain.train import config as configs

    run = tmp_path_factory.mktemp("saved") / "run"
    cfg = configs.load(
        None,
        [
            *TINY,
            *TINY_STEPS,
            "mesh.devices=1",
            "checkpoint.every=2",
            f"data.data_dir={tfds_dir}",
            f"data.manual_dir={shakespeare_dir}",
            f"run.dir={run}",
        ],
    )
    result = loop.pretrain(cfg)
    digests = {row["step"]: row["params_digest"] for row in checkpoint.listing(run)}
    assert sorted(digests) == [2, 4] and len(set(digests.values())) == 2
    assert digests[4] == integrity.tree_digest(result["state"].params)
    return cfg, run, digests


def _copy(saved_run, tmp_path):
    cfg, run, digests = saved_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    from podtrain.train import config as configs

    return configs.replace(cfg, run={"dir": str(dst)}), dst, digests


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_detected_and_an_older_step_restored(kind, saved_run, tmp_path):
    cfg, run, digests = _copy(saved_run, tmp_path)
    damage, reason = DAMAGE[kind]
    damage(run / "checkpoints" / "4")

    listed = {str(r["step"]): r for r in checkpoint.listing(run)}
    bad_step = "6" if kind == "leftover_tmp" else "4"
    assert not listed[bad_step]["valid"] and reason in listed[bad_step]["problem"]

    cfg = loop.resolve(cfg, 66)
    lay = _layout(cfg)
    data_iter = _Iter()
    with pytest.warns(CorruptCheckpointWarning, match=rf"checkpoint step {bad_step}\b.*{reason}"):
        ckpts = checkpoint.Checkpoints(run, cfg.checkpoint)
    state = ckpts.resume(lay.abstract, data_iter)
    ckpts.close()
    want = 4 if kind == "leftover_tmp" else 2
    saved = json.loads((run / "checkpoints" / str(want) / "data" / "process_0-of-1.json").read_text())
    assert int(state.step) == want and data_iter.state == saved and set(saved) == {"streams"}
    assert integrity.tree_digest(state.params) == digests[want]
    if kind == "leftover_tmp":
        assert not (run / "checkpoints" / "6.orbax-checkpoint-tmp").exists()
    else:  # set aside, not deleted, so that step 4 can be saved again
        assert (run / checkpoint.INVALID_DIRNAME / "4").is_dir() and not (run / "checkpoints" / "4").exists()


class _Iter:
    """Stands in for the Grain iterator: records the state it is rewound to."""

    state = None

    def set_state(self, state):
        self.state = state


def test_resume_after_silent_overwrite_gives_the_uninterrupted_result(saved_run, tmp_path):
    """Overwritten bytes (which Orbax itself would restore silently) → redo steps 3-4 from step 2."""
    cfg, run, digests = _copy(saved_run, tmp_path)
    _overwrite_64_bytes(run / "checkpoints" / "4")
    with pytest.warns(CorruptCheckpointWarning, match="checkpoint step 4 is invalid"):
        result = loop.pretrain(cfg)
    assert integrity.tree_digest(result["state"].params) == digests[4]
    assert {r["step"]: r["params_digest"] for r in checkpoint.listing(run)} == digests


def test_no_valid_step_starts_from_scratch_with_a_warning(saved_run, tmp_path):
    cfg, run, _ = _copy(saved_run, tmp_path)
    for step in ("2", "4"):
        _delete_file(run / "checkpoints" / step)
    cfg = loop.resolve(cfg, 66)
    with pytest.warns(CorruptCheckpointWarning):
        ckpts = checkpoint.Checkpoints(run, cfg.checkpoint)
    assert ckpts.resume(_layout(cfg).abstract, _Iter()) is None
    ckpts.close()


def test_keeps_the_newest_and_the_best(tiny_config):
    """keep=1: the newest step and the one with the lowest val_loss survive; others are deleted."""
    cfg = tiny_config(
        "train.steps=6",
        "train.eval_every=2",
        "checkpoint.every=1",
        "checkpoint.keep=1",
        "train.lr=3e-2",
        "train.warmup_steps=0",
    )
    loop.pretrain(cfg)
    rows = checkpoint.listing(cfg.run.dir)
    losses = {r["step"]: r["val_loss"] for r in rows}
    assert all(r["valid"] for r in rows)
    # lr 3e-2 on this tiny model makes the loss go up after its first evals; the best must survive
    from podtrain.train import metrics

    evals = {r["step"]: r["val_loss"] for r in metrics.read(cfg.run.dir) if "val_loss" in r}
    best = min(evals, key=evals.get)
    assert sorted(losses) == sorted({best, 6})
    assert np.isclose(losses[best], evals[best])


def test_saved_config_tokenizer_and_rng(saved_run):
    cfg, run, _ = saved_run
    ckpts = checkpoint.Checkpoints(run)
    assert ckpts.read_json(4, "config")["model"]["d_model"] == 32
    assert ckpts.read_json(4, "tokenizer")["kind"] == "char"
    params = ckpts.host_params(4)
    ckpts.close()
    assert set(params) >= {"embed", "blocks", "final_norm"}
    lay = _layout(loop.resolve(cfg, 66))
    ckpts = checkpoint.Checkpoints(run)
    restored = ckpts.mngr.restore(
        4, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardRestore(lay.abstract))
    )
    ckpts.close()
    want = states.init_state(
        cfg.model if cfg.model.vocab_size else loop.resolve(cfg, 66).model,
        optim.optimizer(cfg.train),
        lay,
        cfg.train.seed,
    ).rng
    np.testing.assert_array_equal(restored.state.rng, want)


def test_no_warnings_for_a_healthy_run(saved_run, tmp_path):
    cfg, run, _ = _copy(saved_run, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCheckpointWarning)
        checkpoint.Checkpoints(run, cfg.checkpoint).close()
        assert jax.tree.leaves(checkpoint.listing(run))


def test_non_finite_steps_are_skipped_then_the_run_stops_with_checkpoints_intact(tiny_config):
    from podtrain.train.health import TrainingDiverged

    # lr 1e30: step 1 applies a finite but enormous update, after which every loss is non-finite
    cfg = tiny_config(
        "train.lr=1e30",
        "train.min_lr=0",
        "train.warmup_steps=0",
        "train.grad_clip=0",
        "train.steps=10",
        "train.max_bad_steps=3",
        "checkpoint.every=1",
        "checkpoint.keep=10",
    )
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps had a non-finite loss.*max_bad_steps=3"):
        loop.pretrain(cfg)
    from podtrain.train import metrics

    rows = metrics.read(cfg.run.dir)
    assert [r["skipped_steps"] for r in rows][:4] == [0, 0, 1, 2]  # counted one step late
    listed = checkpoint.listing(cfg.run.dir)
    assert listed and all(r["valid"] for r in listed)
    # the skipped steps left the parameters of step 1 untouched
    assert len({r["params_digest"] for r in listed}) == 1 and listed[0]["step"] == 1
    assert max(r["step"] for r in listed) >= 3


@pytest.mark.parametrize(
    "spec, want",
    [
        ("runs/a", (Path("runs/a"), None)),
        ("runs/a:12", (Path("runs/a"), 12)),
        ("runs/a:b", (Path("runs/a:b"), None)),  # not a step: part of the directory name
        ("runs/a:5:7", (Path("runs/a:5"), 7)),
        ("runs/a:", (Path("runs/a:"), None)),
    ],
)
def test_run_specs_split_at_the_last_colon_before_a_step(spec, want):
    assert checkpoint.parse_run_spec(spec) == want
