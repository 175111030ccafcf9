"""A run's checkpoints: asynchronous Orbax saves that are verified before they are restored.

Each step folder holds the train state (params, optimizer state, step, RNG key), every process's
Grain iterator state, the resolved config, the tokenizer, the validation loss when one was
measured at that step, and a manifest of file checksums (train/integrity.py). Orbax keeps the
newest `checkpoint.keep` steps plus the one with the lowest validation loss.

`Checkpoints.resume` restores the newest step whose files all match their manifest. Invalid steps
newer than that (incomplete, emptied, truncated, overwritten, missing files) are reported with a
CorruptCheckpointWarning naming the step and moved to `checkpoints_invalid/` (so that training can
save those steps again; nothing is deleted); leftover temporary folders of a save that was killed
are reported and deleted.
"""

import json
import shutil
import warnings
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.path.atomicity_types import TMP_DIR_SUFFIX

from podtrain.parallel import distributed
from podtrain.train import integrity
from podtrain.train.config import CheckpointConfig
from podtrain.train.integrity import CorruptCheckpointWarning
from podtrain.train.state import TrainState

DIRNAME = "checkpoints"
INVALID_DIRNAME = "checkpoints_invalid"
BEST_METRIC = "val_loss"


def parse_run_spec(spec: str) -> tuple[Path, int | None]:
    """'RUN_DIR' or 'RUN_DIR:STEP' as (run dir, step or None); the step is digits after the last ':'."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail.isdigit():
        return Path(head), int(tail)
    return Path(spec), None


def _is_primary() -> bool:
    return jax.process_index() == 0


def _preservation(keep: int):
    return checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep),
            # ascending sort with reverse=True puts the lowest loss last, which BestN keeps
            checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1, keep_checkpoints_without_metrics=False
            ),
        ]
    )


class Checkpoints:
    """The checkpoints of one run directory; `cfg=None` opens them read-only."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.root = self.run_dir / DIRNAME
        self._saving: int | None = None  # the step whose async save is in flight
        writable = cfg is not None
        if writable:
            self._set_aside_invalid()
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=writable,
            create=writable,  # not read_only=True: Orbax logs warnings for it on every CLI call
            preservation_policy=_preservation(cfg.keep) if writable else None,
            best_fn=lambda m: m[BEST_METRIC],  # also makes Orbax save and read the metrics
            best_mode="min",
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal) if writable else None,
        )
        self.mngr = ocp.CheckpointManager(self.root, options=options)

    # -- saving ------------------------------------------------------------------------------

    def _seal(self) -> None:
        """Runs on the primary process once all files of the in-flight step are written."""
        step = self._saving
        tmp, final = self.root / f"{step}{TMP_DIR_SUFFIX}", self.root / str(step)
        integrity.seal(tmp if tmp.is_dir() else final, step)  # no rename on object stores: final

    def save(self, state: TrainState, data_iter, config: dict, tokenizer: dict, val_loss: float | None = None):
        """Start an asynchronous save of the step `state` is at (returns before it is written)."""
        step = int(jax.device_get(state.step))
        self.mngr.wait_until_finished()  # the callback must seal the previous step first
        self._saving = step
        self.mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config),
                tokenizer=ocp.args.JsonSave(tokenizer),
            ),
            metrics=None if val_loss is None else {BEST_METRIC: float(val_loss)},
            force=True,  # our own policy decides when to save
        )

    def close(self) -> None:
        self.mngr.close()

    # -- integrity ---------------------------------------------------------------------------

    def _set_aside_invalid(self) -> None:
        """Warn about invalid steps newer than the newest valid one and about leftovers; move them
        out of Orbax's way (primary only) so that those steps can be saved again."""
        steps, leftovers = integrity.scan(self.root)
        for path in leftovers:
            _warn(
                f"checkpoint step {integrity.tmp_step(path)}: leftover temporary folder {path.name} of a save "
                f"that never completed; deleting it"
            )
            if _is_primary():
                shutil.rmtree(path, ignore_errors=True)
        for status in reversed(steps):
            if status.valid:
                break
            dest = self.run_dir / INVALID_DIRNAME / str(status.step)
            _warn(
                f"checkpoint step {status.step} is invalid ({status.problem}); moved to {dest}, "
                f"an older valid step is used"
            )
            if _is_primary():
                dest.parent.mkdir(parents=True, exist_ok=True)
                while dest.exists():
                    dest = dest.with_name(dest.name + "_")
                status.path.rename(dest)
        distributed.barrier("podtrain_checkpoint_scan")

    def newest_valid(self) -> int | None:
        """The newest step whose files match its manifest (older steps are not read)."""
        steps, _ = integrity.scan(self.root)
        for status in reversed(steps):
            if status.valid:
                return status.step
            _warn(f"checkpoint step {status.step} is invalid ({status.problem}); skipping it")
        return None

    def check_valid(self, step: int) -> None:
        path = self.root / str(step)
        why = integrity.problem(path) if path.is_dir() else "no such step"
        if why is not None:
            raise FileNotFoundError(f"{self.run_dir}: no valid checkpoint at step {step} ({why})")

    # -- restoring ---------------------------------------------------------------------------

    def resume(self, abstract: TrainState, data_iter) -> TrainState | None:
        """Restore the newest valid step onto `abstract`'s shardings and rewind data_iter; None if none."""
        step = self.newest_valid()
        if step is None:
            return None
        restored = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        _restore_data(self.root / str(step) / "data", data_iter)
        return restored.state

    def restore_params(self, abstract_params, step: int | None = None):
        """(params, step): parameters only, onto abstract_params' shardings; newest valid step by default."""
        parts, step = self.restore_parts({"params": abstract_params}, step)
        return parts["params"], step

    def valid_step(self, step: int | None = None) -> int:
        """`step` if it is valid, else the newest valid step when step is None; FileNotFoundError otherwise."""
        if step is None:
            step = self.newest_valid()
            if step is None:
                raise FileNotFoundError(f"{self.run_dir}: no valid checkpoint under {DIRNAME}/")
        else:
            self.check_valid(step)
        return step

    def restore_parts(self, abstract: dict, step: int | None = None):
        """(parts, step): some TrainState fields ({'params': ..., 'buffers': ...}) onto the
        shardings of `abstract`; newest valid step by default."""
        step = self.valid_step(step)
        restored = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                )
            ),
        )
        return {name: restored.state[name] for name in abstract}, step

    def host_params(self, step: int) -> dict:
        """A step's parameters as host numpy arrays (any device count; for digests and inspection)."""
        with ocp.PyTreeCheckpointer() as ckptr:
            path = self.root / str(step) / "state"
            params_meta = dict(ckptr.metadata(path).item_metadata)["params"]
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
            args = ocp.args.PyTreeRestore(
                item={"params": params_meta}, restore_args={"params": restore_args}, partial_restore=True
            )
            return ckptr.restore(path, args=args)["params"]

    def read_json(self, step: int, item: str) -> dict:
        """A JSON item of a step ('config' or 'tokenizer'), read without Orbax."""
        return json.loads((self.root / str(step) / item / "metadata").read_text())

    def metrics(self, step: int) -> dict | None:
        return self.mngr.metrics(step)


def _restore_data(data_dir: Path, data_iter) -> None:
    """Rewind data_iter to the saved position, also when the process count changed.

    Grain saves one file per process. The pipeline (data/pipeline.py) saves the position of each
    of its streams (one per row of the global batch), so the files of all processes together hold
    every stream's position, which any other process count can read back.
    """
    pid, n = jax.process_index(), jax.process_count()
    own = data_dir / f"process_{pid}-of-{n}.json"
    if own.is_file():
        data_iter.set_state(json.loads(own.read_text()))
        return
    saved = sorted(data_dir.glob("process_*-of-*.json"))
    if not saved:
        raise FileNotFoundError(f"{data_dir}: no data iterator state")
    streams = {}
    for path in saved:
        state = json.loads(path.read_text())
        if set(state) != {"streams"}:
            raise ValueError(
                f"{data_dir}: saved with {path.name.split('-of-')[1][:-5]} processes; an iterator state "
                f"with keys {sorted(state)} cannot be moved to {n} processes"
            )
        streams |= state["streams"]
    data_iter.set_state({"streams": streams})


def _warn(message: str) -> None:
    warnings.warn(message, CorruptCheckpointWarning, stacklevel=3)


def restore_params(run_dir: Path, abstract_params, step: int | None = None):
    """Parameters only (for sampling, fine-tuning and export), onto abstract_params' shardings."""
    ckpts = Checkpoints(run_dir)
    try:
        return ckpts.restore_params(abstract_params, step)
    finally:
        ckpts.close()


def restore_parts(run_dir: Path, abstract: dict, step: int | None = None):
    """Some TrainState fields ({'params': ..., 'buffers': ...}) onto `abstract`'s shardings."""
    ckpts = Checkpoints(run_dir)
    try:
        return ckpts.restore_parts(abstract, step)
    finally:
        ckpts.close()


def listing(run_dir: str | Path) -> list[dict]:
    """Every step of a run: {'step', 'valid', 'problem', 'val_loss', 'params_digest'}, oldest first.

    The digest restores each valid step's parameters onto one device (train/integrity.py).
    """
    run_dir = Path(run_dir)
    steps, leftovers = integrity.scan(run_dir / DIRNAME)
    rows = [
        {
            "step": integrity.tmp_step(p),
            "valid": False,
            "problem": "leftover temporary folder",
            "val_loss": None,
            "params_digest": None,
        }
        for p in leftovers
    ]
    if any(s.valid for s in steps):
        ckpts = Checkpoints(run_dir)
        try:
            for s in steps:
                row = {"step": s.step, "valid": s.valid, "problem": s.problem, "val_loss": None, "params_digest": None}
                if s.valid:
                    metrics = ckpts.metrics(s.step) or {}
                    row["val_loss"] = metrics.get(BEST_METRIC)
                    row["params_digest"] = integrity.tree_digest(ckpts.host_params(s.step))
                rows.append(row)
        finally:
            ckpts.close()
    else:
        rows += [
            {"step": s.step, "valid": False, "problem": s.problem, "val_loss": None, "params_digest": None}
            for s in steps
        ]
    return sorted(rows, key=lambda r: str(r["step"]).zfill(12))
