"""`pretrain(config)`: the whole pretraining run, callable from Python with a Config."""

import dataclasses
import math
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from podtrain.data import cache, pipeline, tokenizer
from podtrain.model.config import resolved_vocab
from podtrain.parallel import devices, distributed, rules
from podtrain.train import checkpoint, moe_stats, optim, validate
from podtrain.train import config as configs
from podtrain.train import metrics as metrics_io
from podtrain.train import state as states
from podtrain.train import step as steps
from podtrain.train.config import Config, ConfigError
from podtrain.train.health import BadSteps
from podtrain.train.preemption import PreemptionWatch


def load_data(cfg: Config, tok=None, part: int = 0, parts: int = 1):
    """(tokenizer, training Batches, validation batches on the host, UTF-8 bytes of the validation
    text across all processes); DataError before anything is written. `tok`: a fine-tuning run
    brings its base run's; pretraining builds one from data.tokenizer (a char vocabulary from the
    training documents only)."""
    data, t, bs, seed = cfg.data, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed
    train_in, val_in = pipeline.inputs(data)
    if tok is None:
        tok = tokenizer.from_config(data.tokenizer, lambda: pipeline.texts(train_in))
    train_in, val_in = cache.attach([train_in, val_in], tok, data)
    val, nbytes = pipeline.eval_batches(val_in, tok, t, bs, data.eval_batches, seed, part, parts)
    batches = pipeline.Batches(train_in, tok, t, bs, seed, part, parts, data.workers)
    batches.check()
    return tok, batches, val, float(np.sum(multihost_utils.process_allgather(np.float64(nbytes))))


def resolve(cfg: Config, vocab_size: int) -> Config:
    """cfg with model.vocab_size resolved against a tokenizer of `vocab_size` ids (model/config.py)."""
    try:
        rows = resolved_vocab(vocab_size, cfg.model.vocab_size, cfg.model.vocab_multiple)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg if rows == cfg.model.vocab_size else configs.replace(cfg, model={"vocab_size": rows})


def prepare_run_dir(cfg: Config, tok) -> Path:
    """Create run.dir, or accept it if it holds this same config; never overwrite another run."""
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        old, new = (configs.flat(configs.to_dict(c)) for c in (configs.load(saved), cfg))
        where = ("run.", "mesh.", "launch.", "data.cache")  # where it runs (and reads from) is not what it is
        diffs = [
            f"{key}: {old.get(key)!r} -> {new[key]!r}"
            for key in new
            if not key.startswith(where) and old.get(key) != new[key]
        ]
        if diffs:
            raise ConfigError(
                f"run.dir={run_dir} holds a run with a different config ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}): pass a new run.dir, or the same config to resume"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run.dir={run_dir} exists and is not a podtrain run (no config.yaml): pass a new run.dir")
    distributed.barrier("run_dir_checked")  # every process checks before process 0 writes
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(configs.dump(cfg))
        tokenizer.save_run(tok, run_dir)
    return run_dir


def global_batch(local: dict[str, np.ndarray], sharding, batch_size: int) -> dict[str, jax.Array]:
    """One global (batch_size, ...) array per key from this process's rows of it."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:])) for k, v in local.items()
    }


def evaluate(eval_step, params, batches, buffers=None) -> tuple[float, float]:
    """(mean loss per token in nats, summed loss in nats) over the validation batches."""
    total_loss, total_weight = 0.0, 0.0
    for batch in batches:
        # one batch at a time: independent programs in flight together can deadlock XLA:CPU with
        # several devices in one process (each waits in a collective for devices with no thread left)
        loss_sum, weight = jax.device_get(eval_step(params, batch, buffers))
        total_loss, total_weight = total_loss + float(loss_sum), total_weight + float(weight)
    return total_loss / total_weight, total_loss


def eval_row(loss: tuple[float, float], nbytes: float) -> dict:
    """val_loss (nats per token) and val_bpb (bits per UTF-8 byte of the evaluated text): runs
    with different tokenizers compare on the second."""
    return {"val_loss": loss[0], "val_bpb": loss[1] / math.log(2) / nbytes if nbytes else math.nan}


@dataclasses.dataclass(frozen=True)
class Validation:
    """The fixed validation batches (global arrays) and the UTF-8 bytes of the text they cover."""

    batches: list
    nbytes: float

    def measure(self, eval_step, params, buffers=None) -> dict:
        return eval_row(evaluate(eval_step, params, self.batches, buffers), self.nbytes)


def start_run(cfg: Config) -> Mesh:
    """What pretrain and finetune do first, in this order: on a CPU host make the cores JAX devices
    (parallel/devices.py; not once a backend runs), join the job when a launcher started several
    processes, and build the mesh after checking the config against it."""
    devices.use_cpu_cores_for(cfg.mesh, cfg.train.batch_size // cfg.train.grad_accum_steps, cfg.model.d_model)
    distributed.initialize()
    return validate.build_mesh(cfg)


def pretrain(cfg: Config) -> dict:
    """Train from scratch, or resume from run.dir's newest valid checkpoint. Returns final figures.

    On SIGTERM: finishes the current step, saves it and returns with 'preempted': True.
    """
    mesh = start_run(cfg)
    batch_sharding = rules.batch_sharding(mesh)
    bs = cfg.train.batch_size
    part, parts = rules.process_batch_slice(batch_sharding, bs)  # this process reads only its rows
    tok, data_iter, val_host, val_bytes = load_data(cfg, None, part, parts)
    cfg = resolve(cfg, tok.vocab_size)
    run_dir = prepare_run_dir(cfg, tok)

    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, mesh)
    train_step = steps.make_train_step(lay, tx, cfg.train, cfg.model)
    eval_step = steps.make_eval_step(lay)
    val = Validation([global_batch(b, batch_sharding, bs) for b in val_host], val_bytes)

    ckpts = checkpoint.Checkpoints(run_dir, cfg.checkpoint)
    state = ckpts.resume(lay.abstract, data_iter)
    if state is None:
        state = states.init_state(cfg.model, tx, lay, cfg.train.seed)
    return run_loop(cfg, run_dir, tok, lay, state, train_step, eval_step, data_iter, val, ckpts)


def run_loop(
    cfg: Config,
    run_dir: Path,
    tok,
    lay: states.Layout,
    state: states.TrainState,
    train_step,
    eval_step,
    data_iter,
    val: Validation,
    ckpts: checkpoint.Checkpoints,
    *,
    eval_first: bool = False,
) -> dict:
    """The step loop that pretrain and finetune share: steps state.step + 1 .. train.steps, logs
    (loss, lr, tokens/s, MFU, MoE statistics), evaluates (with state.buffers), checkpoints, stops
    on SIGTERM or diverged training. Returns the final figures.

    eval_first: a fresh run (step 0) first evaluates and logs the model it starts from (fine-tuning:
    the base model on the new data). On SIGTERM: finishes the current step, saves it and returns
    with 'preempted': True.
    """
    t, bs = cfg.data.seq_len, cfg.train.batch_size
    pid = jax.process_index()
    batch_sharding = rules.batch_sharding(lay.mesh)
    start = int(jax.device_get(state.step))
    saved = {"config": configs.to_dict(cfg), "tokenizer": tok.spec()}
    bad = BadSteps(cfg.train.max_bad_steps, before_stop=ckpts.close)
    preempted = False

    peak = cfg.train.peak_flops or devices.peak_flops_per_device()
    flops_per_step = cfg.model.flops_per_token(t) * bs * t  # active parameters
    log = metrics_io.MetricsLog(run_dir, enabled=pid == 0)
    schedule = optim.schedule(cfg.train)
    progress = tqdm(
        total=cfg.train.steps,
        initial=start,
        disable=not cfg.run.progress or pid != 0,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    val_loss = math.nan
    if eval_first and start == 0:
        evaluated = val.measure(eval_step, state.params, state.buffers)
        val_loss = evaluated["val_loss"]
        log.write(0, evaluated)
        progress.write(f"step 0: val_loss {val_loss:.4f}, val_bpb {evaluated['val_bpb']:.4f} (before training)")
    window_start, window_steps = None, 0
    preemption = PreemptionWatch().start()
    for step in range(start + 1, cfg.train.steps + 1):
        state, out = train_step(state, global_batch(next(data_iter), batch_sharding, bs))
        bad.observe(step, out["skipped"])
        if window_start is None:  # the first step compiles: time from its end
            jax.block_until_ready(out)
            window_start = time.perf_counter()
        else:
            window_steps += 1
        row = {}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            out = jax.device_get(out)
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * bs * t / elapsed if window_steps else math.nan
            row = {
                "train_loss": out["train_loss"],
                "grad_norm": out["grad_norm"],
                "lr": schedule(step - 1),
                "tokens_per_s": tokens_per_s,
                "skipped_steps": bad.total,
                "mfu": tokens_per_s / (bs * t) * flops_per_step / (peak * jax.device_count()),
            }
            window_start, window_steps = time.perf_counter(), 0
            postfix = {"loss": f"{out['train_loss']:.4f}", "tok_s": f"{tokens_per_s:,.0f}"}
            if "moe" in out:
                row |= moe_stats.flatten(out["moe"], moe_stats.moe_layers(cfg.model))
                postfix["load_max/min"] = moe_stats.summary(row)
            progress.set_postfix(postfix, refresh=False)
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            row |= val.measure(eval_step, state.params, state.buffers)
            val_loss = row["val_loss"]
            moe_line = f", expert load max/min {moe_stats.summary(row)} x mean" if "moe/load_max" in row else ""
            progress.write(f"step {step}: val_loss {val_loss:.4f}, val_bpb {row['val_bpb']:.4f}{moe_line}")
        if row:
            log.write(step, row)
        preempted = preemption.reached(step) and step < cfg.train.steps  # the last step ends the run anyway
        if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or preempted:
            ckpts.save(state, data_iter, **saved, val_loss=row.get("val_loss"))
        progress.update(1)
        if preempted:
            progress.write(f"step {step}: preempted (SIGTERM); saved this step, stopping")
            break
    preemption.stop()
    bad.flush()
    progress.close()
    ckpts.close()
    if math.isnan(val_loss):  # resumed at the last step: nothing ran, evaluate what was restored
        val_loss = val.measure(eval_step, state.params, state.buffers)["val_loss"]
    if hasattr(data_iter, "close"):
        data_iter.close()
    if pid == 0:
        metrics_io.plot_loss(run_dir)
        moe_stats.plot_load(run_dir)
    log.close()
    return {
        "val_loss": val_loss,
        "step": step if preempted else cfg.train.steps,
        "run_dir": str(run_dir),
        "state": state,
        "preempted": preempted,
        "skipped_steps": bad.total,
    }
