"""The `podtrain` command: parse, validate, call one library function.

Bad input (config errors, missing or malformed dataset files, also a bad record that a Grain worker
meets mid-run, a run dir of another config) is reported in one line on stderr with exit code 2; a
diverged run (train.max_bad_steps non-finite steps in a row) with exit code 1; a run stopped by
SIGTERM after saving its current step exits with 143 (rerun the same command to resume); anything
else is a bug and keeps its traceback.
"""

import argparse
import sys

from podtrain.data import DatasetUnavailable
from podtrain.train.config import ConfigError

USER_ERRORS = (ConfigError, DatasetUnavailable)


def _pretrain(args) -> None:
    from podtrain.train import config

    cfg = config.load(args.config, args.overrides)
    from podtrain.train import loop  # slow to import (TensorBoard, Orbax): only once the config is good

    result = loop.pretrain(cfg)
    if result["preempted"]:
        return _preempted(result)
    print(f"final val_loss {result['val_loss']:.4f} at step {result['step']} (run dir {result['run_dir']})")


def _finetune(args) -> int | None:
    from podtrain.train import config

    cfg = config.load(args.config, args.overrides)
    from podtrain.train import finetune  # slow to import: only once the config is good

    result = finetune.finetune(cfg)
    if result["preempted"]:
        return _preempted(result)
    print(
        f"final val_loss {result['val_loss']:.4f} at step {result['step']} from {result['base']} "
        f"(run dir {result['run_dir']})"
    )


def _preempted(result) -> int:
    from podtrain.train.preemption import PREEMPTED_EXIT_CODE

    print(f"preempted: saved step {result['step']} in {result['run_dir']}; run the same command again to resume")
    return PREEMPTED_EXIT_CODE


def _checkpoints(args) -> int:
    from podtrain.train import checkpoint

    rows = checkpoint.listing(args.run_dir)
    if not rows:
        print(f"{args.run_dir}: no checkpoints")
        return 1
    print(f"{'step':>8}  {'status':<7}  {'val_loss':>8}  params sha256 / problem")
    for r in rows:
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        detail = r["params_digest"] if r["valid"] else r["problem"]
        print(f"{r['step']:>8}  {'valid' if r['valid'] else 'INVALID':<7}  {loss:>8}  {detail}")
    return 0


def _sample(args) -> None:
    from podtrain.inference import generate

    text = generate.sample_run(
        args.run, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed
    )
    print(text)


def _plan(args) -> int:
    from podtrain.plan import estimate as plan
    from podtrain.train import config

    cfg = config.load(args.config, args.overrides)
    if args.num_slices < 1:
        raise config.ConfigError(f"--num-slices={args.num_slices} must be >= 1")
    if args.search:
        fits = any(e.fits for e in plan.search(cfg, args.topology, args.num_slices))
    else:
        fits = plan.plan(cfg, args.topology, args.num_slices).fits
    return 0 if fits else 1  # scripts can gate a submission on it


def _submit(args) -> int:
    from podtrain.launch import submit
    from podtrain.train import config

    cfg = config.load(args.config, args.overrides)
    return submit.submit(cfg, args.target, dry_run=args.dry_run)


def _launch_local(args) -> int:
    from podtrain.launch import local

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    if not command:
        raise ConfigError("launch local: give the podtrain command to run after --, e.g. -- pretrain --config c.yaml")
    if args.processes < 1 or args.devices_per_process < 1:
        raise ConfigError(
            f"launch local: --processes={args.processes} and --devices-per-process={args.devices_per_process} "
            f"must be >= 1"
        )
    return local.launch(command, args.processes, args.devices_per_process)


def _export(args) -> None:
    from podtrain.interop import export
    from podtrain.train import checkpoint

    run_dir, step = checkpoint.parse_run_spec(args.run)
    out = export.export(run_dir, args.out, fmt=args.format, step=step, max_shard_size=args.max_shard_size)
    print(f"exported {run_dir} ({args.format}) to {out}")


def _import(args) -> None:
    from podtrain.interop import export

    out = export.import_hf(args.hf, args.out, args.overrides)
    print(f"imported {args.hf} as run dir {out}")


def _tokenizer_train(args) -> None:
    from podtrain.data import tokenizer_train
    from podtrain.train import config

    cfg = config.load(args.config, args.overrides)
    try:
        tokenizer_train.check_args(args.vocab_size, args.kind)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_new_folder(args.out)
    progress = sys.stdout.isatty()  # the trainers draw on stdout; off a terminal they print only blank lines
    tok = tokenizer_train.train_to(cfg.data, args.vocab_size, args.out, args.kind, progress)
    print(f"wrote {args.out}: {tok.kind} {args.kind} tokenizer, {tok.vocab_size} ids, EOS id {tok.eos_id}")


def _data_prepare(args) -> None:
    from podtrain.train import config

    cfg = config.load(args.config, args.overrides)
    from podtrain.data import cache

    for c in cache.prepare(cfg.data, progress=sys.stderr.isatty()):
        what = "wrote" if c.written else "already prepared"
        print(f"{what} {c.folder}: {c.source}, {c.units} units, {c.tokens:,} tokens")


def _check_new_folder(out: str) -> None:
    from etils import epath

    path = epath.Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty: pass a new directory (nothing is overwritten)")


def _tokenizer_encode(args) -> None:
    import json

    from podtrain.data import tokenizer

    if (args.text is None) == (args.file is None):
        raise ConfigError("tokenizer encode: pass exactly one of --text TEXT or --file FILE")
    text = args.text
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--file {args.file}: not readable UTF-8 text ({e})") from None
    fix = "pass a folder or file holding tokenizer.json, tokenizer.model or podtrain.json"
    tok = tokenizer.load(args.tokenizer, f"--tokenizer {args.tokenizer}", fix)
    try:
        ids = tok.encode(text)
    except ValueError as e:  # a char tokenizer meeting characters it does not know
        raise ConfigError(f"--text/--file: {e}") from None
    print(json.dumps(ids.tolist()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="podtrain", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pretrain a model from a YAML config")
    pre.add_argument("--config", required=True, help="YAML config file, e.g. configs/shakespeare_char.yaml")
    pre.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 model.d_model=256")
    pre.set_defaults(func=_pretrain)

    ft = sub.add_parser("finetune", help="fine-tune from another run's parameters (finetune.init_from=RUN_DIR[:STEP])")
    ft.add_argument("--config", required=True, help="YAML config file, e.g. configs/shakespeare_char_ft.yaml")
    ft.add_argument("overrides", nargs="*", help="dotted overrides, e.g. finetune.init_from=runs/shakespeare_char")
    ft.set_defaults(func=_finetune)

    smp = sub.add_parser("sample", help="generate text from a run's latest checkpoint (KV cache)")
    smp.add_argument("--run", required=True, help="run directory")
    smp.add_argument("--prompt", default="\n")
    smp.add_argument("--max-new-tokens", type=int, default=200)
    smp.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    smp.add_argument("--top-k", type=int, default=0, help="0 means no top-k filtering")
    smp.add_argument("--seed", type=int, default=0)
    smp.set_defaults(func=_sample)

    ck = sub.add_parser("checkpoints", help="list a run's checkpoint steps: valid or not, and a parameter digest")
    ck.add_argument("run_dir", help="run directory")
    ck.set_defaults(func=_checkpoints)

    pln = sub.add_parser(
        "plan",
        help="compile the train step for a TPU slice or GPU nodes here (no accelerator): memory, FLOPs, step time",
    )
    pln.add_argument("--config", required=True)
    pln.add_argument(
        "--topology",
        required=True,
        help="TPU slice (v5p-256, v5litepod-16, v6e-64, v5p:4x4x8) or H100 nodes of 8 (h100-8, h100-16)",
    )
    pln.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    pln.add_argument("--search", action="store_true", help="try mesh degrees and remat policies, rank those that fit")
    pln.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=512")
    pln.set_defaults(func=_plan)

    sbm = sub.add_parser("submit", help="start the run on TPU VMs, GKE, SLURM or local processes (settings: launch.*)")
    sbm.add_argument("--target", required=True, choices=("tpu-vm", "gke", "slurm", "local"))
    sbm.add_argument("--config", required=True)
    sbm.add_argument("--dry-run", action="store_true", help="print the script that would run, run nothing")
    sbm.add_argument("overrides", nargs="*", help="dotted overrides, e.g. launch.job_name=exp1 launch.num_slices=2")
    sbm.set_defaults(func=_submit)

    lau = sub.add_parser("launch", help="start a multi-process job")
    where = lau.add_subparsers(dest="where", required=True)
    loc = where.add_parser("local", help="P processes on 127.0.0.1 with fake CPU devices, output prefixed [pN]")
    loc.add_argument("--processes", type=int, default=2)
    loc.add_argument("--devices-per-process", type=int, default=4)
    loc.add_argument("command_args", nargs=argparse.REMAINDER, help="-- then a podtrain command, e.g. -- pretrain ...")
    loc.set_defaults(func=_launch_local)

    tok = sub.add_parser("tokenizer", help="train a tokenizer on the configured corpus, or show a text's ids")
    verb = tok.add_subparsers(dest="verb", required=True)
    trn = verb.add_parser("train", help="train a tokenizer.json (tokenizers' trainers) on data.dataset's train split")
    trn.add_argument("--config", required=True, help="YAML config whose data section names the corpus")
    trn.add_argument("--vocab-size", type=int, required=True, help="ids in all, EOS (<|endoftext|>) included")
    trn.add_argument("--kind", default="bpe", help="bpe (byte-level BPE, as Llama 3) or unigram")
    trn.add_argument("--out", required=True, help="new directory for tokenizer.json and tokenizer_config.json")
    trn.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.dataset=/data/train-*.jsonl")
    trn.set_defaults(func=_tokenizer_train)
    enc = verb.add_parser("encode", help="print a text's ids (no special tokens) as one JSON list")
    enc.add_argument("--tokenizer", required=True, help="tokenizer file or folder (a run's tokenizer/ folder too)")
    enc.add_argument("--text", help="the text")
    enc.add_argument("--file", help="a UTF-8 text file")
    enc.set_defaults(func=_tokenizer_encode)

    dat = sub.add_parser("data", help="prepare the configured data ahead of training")
    dverb = dat.add_subparsers(dest="verb", required=True)
    prp = dverb.add_parser(
        "prepare", help="build TFDS datasets and write the pre-tokenized cache (data.cache) that training reads"
    )
    prp.add_argument("--config", required=True, help="the run's YAML config: its data section and tokenizer")
    prp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.workers=4 data.cache=/fast/cache")
    prp.set_defaults(func=_data_prepare)

    exp = sub.add_parser("export", help="write a run's weights for transformers (hf) or as safetensors")
    exp.add_argument("run", help="run directory, optionally RUN_DIR:STEP (default: latest checkpoint)")
    exp.add_argument("--format", default="hf", help="hf (transformers) or safetensors (our names)")
    exp.add_argument("--out", required=True, help="new output directory")
    exp.add_argument("--max-shard-size", default="5GB", help="split safetensors files past this size")
    exp.set_defaults(func=_export)

    imp = sub.add_parser("import", help="turn a transformers model directory (safetensors) into a run dir")
    imp.add_argument("--hf", required=True, help="directory with config.json and safetensors weights")
    imp.add_argument("--out", required=True, help="new run directory")
    imp.add_argument("overrides", nargs="*", help="dotted overrides for the run config, e.g. data.seq_len=256")
    imp.set_defaults(func=_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from podtrain.train.health import TrainingDiverged

    command = " ".join(filter(None, (args.command, getattr(args, "verb", None))))  # podtrain data prepare
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        print(f"podtrain {command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # not a bug and not bad input: the run itself failed
        print(f"podtrain {command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
