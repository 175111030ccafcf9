"""Per-device bytes of parameters + optimizer state under FSDP, from the compiled train step.

Compiles (never runs) the train step of a ~53M-parameter model on 8 fake CPU devices for
fsdp = 1, 2, 4, 8 (data parallel over the rest) and reads the per-device argument bytes from
XLA's memory analysis of the compiled step. The arguments are the train state and one batch;
the batch's share is printed separately, and the state's bytes are cross-checked against the
shard shapes of its shardings.

    python bench/mesh_memory.py
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from podtrain.parallel import rules  # noqa: E402
from podtrain.train import config as configs  # noqa: E402
from podtrain.train import optim, validate
from podtrain.train import state as states
from podtrain.train import step as steps

DEVICES = 8
# ~53M parameters: 8 layers of d_model 512 (27.3M) and a GPT-2-sized vocab of 50304 (25.8M).
MODEL = [
    "model.num_layers=8",
    "model.d_model=512",
    "model.num_heads=8",
    "model.num_kv_heads=8",
    "model.mlp_dim=1536",
    "model.vocab_size=50304",
    "model.scan_layers=scan",
    "data.seq_len=128",
    "train.batch_size=8",
]


def shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (device 0's shards)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def measure(fsdp: int, overrides: list[str]) -> dict:
    cfg = configs.load(None, MODEL + [f"mesh.data={DEVICES // fsdp}", f"mesh.fsdp={fsdp}", *overrides])
    mesh = validate.build_mesh(cfg)
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, mesh)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    sharding = rules.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding) for k in ("inputs", "targets")}
    compiled = steps.make_train_step(lay, tx, cfg.train, cfg.model).lower(lay.abstract, batch).compile()
    analysis = compiled.memory_analysis()
    batch_bytes = shard_bytes(batch)
    return {
        "fsdp": fsdp,
        "params": states.count_params(lay.abstract.params),
        "arguments": analysis.argument_size_in_bytes,
        "batch": batch_bytes,
        "state": analysis.argument_size_in_bytes - batch_bytes,
        "state_from_shardings": shard_bytes(lay.abstract),
        "temp": analysis.temp_size_in_bytes,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_layers=4")
    args = p.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", DEVICES)
    rows = [measure(f, args.overrides) for f in args.fsdp]
    base = rows[0]["state"]
    print(f"{rows[0]['params'] / 1e6:.1f}M parameters, {DEVICES} fake CPU devices, AdamW (fp32 params, mu, nu)")
    print(
        f"{'fsdp':>4} {'data':>4} {'args/device':>14} {'batch':>7} {'params+opt/device':>18} "
        f"{'from shardings':>15} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['fsdp']:>4} {DEVICES // r['fsdp']:>4} {r['arguments']:>14,} {r['batch']:>7,} {r['state']:>18,} "
            f"{r['state_from_shardings']:>15,} {r['state'] / base:>6.3f}"
        )


if __name__ == "__main__":
    main()
