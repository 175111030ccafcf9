"""`finetune(config)`: continue from another run's parameters on new data, fully, frozen in part, or LoRA.

Parameters only come from `finetune.init_from=RUN_DIR[:STEP]` (newest valid step by default); the
optimizer and the learning-rate schedule start fresh. The base run's tokenizer (its run dir's
tokenizer/ folder) is always used: the config's model must have the base's parameter shapes
(model.vocab_size=0 resolves as in pretraining), and the data only characters the tokenizer knows; a
mismatch lists the offending parameter paths or characters (ConfigError, exit 2). MoE models also
take the base run's router biases (buffers) and must route like it (ROUTING_KEYS). This module
only builds the adapter's layout, the data and the initial state; the steps run in pretraining's
loop (train/loop.py run_loop), so fine-tuning logs, evaluates, checkpoints and resumes like it.

Data: any source pretraining reads (data/sources.py). Records with 'prompt' and 'completion' are
examples (loss on the completion and its EOS only, placed whole in a row); records with 'messages'
are chats, rendered with the tokenizer's chat template (loss on the assistant turns and the final
EOS only, placed whole: data/chat.py); others are text.
"""

from pathlib import Path

from flax import nnx
from orbax.checkpoint import PyTreeCheckpointer

from podtrain.data import pipeline, tokenizer
from podtrain.parallel import mesh as meshes
from podtrain.parallel import rules
from podtrain.parallel.config import MeshConfig
from podtrain.train import adapters, checkpoint, loop, optim
from podtrain.train import config as configs
from podtrain.train import state as states
from podtrain.train import step as steps
from podtrain.train.config import Config, ConfigError


def parse_init_from(value: str) -> tuple[Path, int | None]:
    if not value:
        raise ConfigError("finetune.init_from is empty: pass finetune.init_from=RUN_DIR or RUN_DIR:STEP")
    run_dir, step = checkpoint.parse_run_spec(value)
    run_dir = run_dir.expanduser().resolve()
    if not (run_dir / checkpoint.DIRNAME).is_dir():
        raise ConfigError(f"finetune.init_from={value}: {run_dir} holds no {checkpoint.DIRNAME}/ (not a podtrain run)")
    return run_dir, step


# MoE settings that change what a model with the same parameter shapes computes
ROUTING_KEYS = ("top_k", "router", "normalize_topk", "n_groups", "topk_groups", "routed_scaling")


def base_checkpoint(cfg: Config) -> tuple[Path, int, tokenizer.Tokenizer]:
    """(base run dir, step, its tokenizer), checking the tokenizer files are the ones the step was
    trained with, data.tokenizer does not name another tokenizer (`_check_tokenizer`), and the MoE
    routing settings (which parameter shapes do not show) match the base run's."""
    run_dir, step = parse_init_from(cfg.finetune.init_from)
    base = checkpoint.Checkpoints(run_dir)
    try:
        try:
            step = base.valid_step(step)
        except FileNotFoundError as e:
            raise ConfigError(f"finetune.init_from={cfg.finetune.init_from}: {e}") from None
        spec = base.read_json(step, "tokenizer")
        base_moe = base.read_json(step, "config").get("model", {}).get("moe", {})
    finally:
        base.close()
    _check_routing(cfg, base_moe, f"{run_dir} step {step}")
    tok = tokenizer.load_run(run_dir)
    if tok is None or tok.fingerprint != spec.get("fingerprint"):
        state = "holds no tokenizer/ folder" if tok is None else "has tokenizer/ files other than"
        raise ConfigError(
            f"finetune.init_from={cfg.finetune.init_from}: {run_dir} {state} the tokenizer step {step} was "
            f"trained with; restore that run's {tokenizer.RUN_FOLDER}/ folder"
        )
    _check_tokenizer(cfg, tok)
    return run_dir, step, tok


def _check_tokenizer(cfg: Config, tok: tokenizer.Tokenizer) -> None:
    """Fine-tuning always uses the base run's tokenizer. data.tokenizer may stay at its default
    'char' (a char tokenizer is built from a corpus, which fine-tuning never does); 'byte' or a path
    must name the base run's tokenizer, so a config that expects another one fails here."""
    want = cfg.data.tokenizer
    if want == "char":
        return
    same = tok.kind == "byte" if want == "byte" else tokenizer.load(want, f"data.tokenizer={want}") == tok
    if not same:
        raise ConfigError(
            f"data.tokenizer={want!r} does not match the base run's {tok.kind!r} tokenizer: omit data.tokenizer "
            f"(fine-tuning uses the base run's)"
        )


def _check_routing(cfg: Config, base_moe: dict, where: str) -> None:
    ours = configs.to_dict(cfg)["model"]["moe"]
    diffs = [
        f"model.moe.{k}={ours[k]!r} (base {base_moe[k]!r})"
        for k in ROUTING_KEYS
        if cfg.model.moe.enabled and k in base_moe and base_moe[k] != ours[k]
    ]
    if diffs:
        raise ConfigError(
            f"MoE routing differs from the base run {where}: {'; '.join(diffs)}; "
            f"use the base run's model.moe section (its config.yaml)"
        )


def check_architecture(cfg: Config, run_dir: Path, step: int) -> None:
    """ConfigError listing every parameter or buffer path whose shape differs, is missing, or is extra."""
    with PyTreeCheckpointer() as ckptr:
        meta = dict(ckptr.metadata(run_dir / checkpoint.DIRNAME / str(step) / "state").item_metadata)
    base = {
        p: tuple(m.shape) for part in ("params", "buffers") for p, m in adapters.flatten(meta.get(part) or {}).items()
    }
    _, abstract_params, abstract_buffers = states.abstract_model(cfg.model)
    ours = {
        adapters.path_str(p): tuple(v.shape)
        for tree in (abstract_params, abstract_buffers)
        for p, v in nnx.to_flat_state(tree)
    }
    diffs = [
        f"{p}: base {base.get(p, 'missing')} vs {ours.get(p, 'missing')}"
        for p in sorted(base.keys() | ours.keys())
        if base.get(p) != ours.get(p)
    ]
    if diffs:
        raise ConfigError(
            f"model does not match the base run {run_dir} step {step}: {'; '.join(diffs)}; "
            f"use the base run's model section (its config.yaml)"
        )


def load_data(cfg: Config, tok, part: int, parts: int):
    """loop.load_data with the base run's tokenizer, after checking that it can encode every
    training and validation document (a char vocabulary may lack some of the new data's characters)."""
    if tok.kind == "char":
        train_in, val_in = pipeline.inputs(cfg.data)
        for split, ins in (("train", train_in), ("validation", val_in)):
            for i, text in enumerate(pipeline.texts(ins)):
                try:
                    tok.encode(text)
                except ValueError as e:
                    raise ConfigError(
                        f"data {split} document {i}: {e}; the base run's tokenizer cannot encode them (clean the data)"
                    ) from None
    _, batches, val, nbytes = loop.load_data(cfg, tok, part, parts)
    return batches, val, nbytes


def finetune(cfg: Config) -> dict:
    """Fine-tune (or resume fine-tuning in run.dir). Returns loop.run_loop's figures and
    'params': merged, in the base model's tree; 'base': RUN_DIR:STEP it started from. Starts
    like pretrain (loop.start_run)."""
    mesh = loop.start_run(cfg)
    base_dir, base_step, tok = base_checkpoint(cfg)
    cfg = loop.resolve(cfg, tok.vocab_size)
    check_architecture(cfg, base_dir, base_step)
    batch_sharding = rules.batch_sharding(mesh)
    part, parts = rules.process_batch_slice(batch_sharding, cfg.train.batch_size)  # this process's rows
    data_iter, val_host, val_bytes = load_data(cfg, tok, part, parts)
    run_dir = loop.prepare_run_dir(cfg, tok)

    adapter = adapters.build(cfg.finetune, cfg.model)
    tx = optim.optimizer(cfg.train)
    lay = adapters.layout(adapter, cfg.model, tx, mesh)
    train_step = steps.make_train_step(lay, tx, cfg.train, cfg.model, adapter.materialize)
    eval_step = steps.make_eval_step(lay, adapter.materialize)
    val = loop.Validation([loop.global_batch(b, batch_sharding, cfg.train.batch_size) for b in val_host], val_bytes)

    ckpts = checkpoint.Checkpoints(run_dir, cfg.checkpoint)
    state = ckpts.resume(lay.abstract, data_iter)
    if state is None:
        base = base_parts(cfg, mesh, base_dir, base_step)
        state = adapters.init_state(adapter, base["params"], base.get("buffers", {}), tx, lay, cfg.train.seed)
    result = loop.run_loop(cfg, run_dir, tok, lay, state, train_step, eval_step, data_iter, val, ckpts, eval_first=True)
    return result | {"params": adapter.merged(result["state"].params), "base": f"{base_dir}:{base_step}"}


def base_parts(cfg: Config, mesh, run_dir: Path, step: int) -> dict:
    """The base run's {'params', 'buffers' (MoE router biases; absent for dense)} at `step`,
    on the shardings pretraining would give them on `mesh`."""
    model_lay = states.layout(cfg.model, optim.optimizer(cfg.train), mesh)
    parts = {"params": model_lay.abstract.params, "buffers": model_lay.abstract.buffers}
    parts, _ = checkpoint.restore_parts(run_dir, {k: v for k, v in parts.items() if v}, step)
    return parts


def merged_params(run_dir: str | Path, step: int | None = None):
    """(parameters in the base model's tree with LoRA factors merged, step) of a fine-tuning run: for export."""
    cfg = configs.load(Path(run_dir) / "config.yaml")
    adapter = adapters.build(cfg.finetune, cfg.model)
    mesh = meshes.build_mesh(MeshConfig(devices=1))  # whatever mesh (and slices) the run trained on
    lay = adapters.layout(adapter, cfg.model, optim.optimizer(cfg.train), mesh)
    params, step = checkpoint.restore_params(run_dir, lay.abstract.params, step)
    return adapter.merged(params), step
