"""Step time of an MoE model over the dense model with the same active parameters.

MoE: E=8 experts, top-2, expert hidden F. Dense: hidden 2F. Same attention, shapes and batch.
Prints, from one run, each model's train-step time and MFU (FLOPs of *active* parameters) and
the ratios MoE / dense for dropless and capacity (cf=1.25) dispatch. Models are timed in
interleaved rounds and each keeps its best round, so load from other processes hits all alike.

  python bench/moe_efficiency.py [--d-model 256 --expert-hidden 512 ...]
"""

import argparse
import time

import jax

from podtrain.parallel import devices, rules
from podtrain.parallel import mesh as meshes
from podtrain.train import config as configs
from podtrain.train import optim
from podtrain.train import state as states
from podtrain.train import step as steps

TARGETS = {"dropless": 1.15, "capacity": 1.30}


def build(overrides: list[str]):
    cfg = configs.load(None, overrides)
    mesh = meshes.build_mesh(cfg.mesh)
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, mesh)
    step = steps.make_train_step(lay, tx, cfg.train, cfg.model)
    state = states.init_state(cfg.model, tx, lay, 0)
    return cfg, mesh, step, state


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=512, help="F; the dense model has 2F")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument(
        "--block-size", type=int, default=0, help="rows per block of the CPU dropless path (0: the config default)"
    )
    args = p.parse_args(argv)

    d, f = args.d_model, args.expert_hidden
    common = [
        "model.vocab_size=256",
        f"model.num_layers={args.layers}",
        f"model.d_model={d}",
        "model.num_heads=4",
        "model.num_kv_heads=4",
        f"data.seq_len={args.seq_len}",
        f"train.batch_size={args.batch}",
        "mesh.devices=1",
    ]
    moe = [
        "model.moe.num_experts=8",
        "model.moe.top_k=2",
        f"model.moe.expert_mlp_dim={f}",
        "model.moe.load_balance_coef=0.01",
    ]
    moe += [f"model.moe.block_size={args.block_size}"] if args.block_size else []
    variants = {
        "dense": common + [f"model.mlp_dim={2 * f}"],
        "dropless": common + moe + ["model.moe.dispatch=dropless"],
        "capacity": common + moe + ["model.moe.dispatch=capacity", "model.moe.capacity_factor_train=1.25"],
    }
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len + 1), 0, 256)
    batch_np = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    runs = {}
    for name, overrides in variants.items():
        cfg, mesh, step, state = build(overrides)
        batch = jax.device_put(batch_np, rules.batch_sharding(mesh))
        state, out = step(state, batch)  # compile
        jax.block_until_ready(out)
        runs[name] = [cfg, step, state, batch, float("inf")]
    for _ in range(args.rounds):
        for run in runs.values():
            cfg, step, state, batch, best = run
            t = time.perf_counter()
            for _ in range(args.steps):
                state, out = step(state, batch)
            jax.block_until_ready(out)
            run[2], run[4] = state, min(best, (time.perf_counter() - t) / args.steps)

    peak = devices.peak_flops_per_device()
    print(
        f"backend {jax.default_backend()}, d_model {d}, F {f} (dense 2F = {2 * f}), layers {args.layers}, "
        f"seq {args.seq_len}, batch {args.batch}; best of {args.rounds} interleaved rounds x {args.steps} steps"
    )
    result = {}
    for name, (cfg, _, _, _, secs) in runs.items():
        flops = cfg.model.flops_per_token(args.seq_len) * args.batch * args.seq_len
        print(f"{name:>9}: {secs * 1e3:8.1f} ms/step  MFU {flops / secs / peak:6.1%} (active parameters)")
        result[name] = secs
    dense = result["dense"]
    for name, target in TARGETS.items():
        ratio = result[name] / dense
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"{name} / dense = {ratio:.3f}  (target <= {target}: {verdict})")
        result[f"{name}_ratio"] = ratio
    return result


if __name__ == "__main__":
    main()
