"""Training-step throughput and MFU at the nanoGPT shape and at a larger shape.

Times the real train step (`train.step.make_train_step` over `train.state.layout`: the sharded
jit path), compile excluded, on device-resident random batches. Each repetition times `--steps`
back-to-back steps; the figure is the median over `--reps`. Two layouts per shape: one CPU device
(XLA threads each op over the cores) and `podtrain pretrain`'s default on a CPU host, one device
per core with the batch data-parallel over them (parallel/devices.py: use_cpu_cores).

MFU = achieved FLOP/s / measured f32 matmul peak of this machine (the best of several
measurements spread through the run), with the FLOPs of
`ModelConfig.flops_per_token` (PaLM convention: 6 * N_matmul + 12 * L * N * H * T).

    python bench/train_throughput.py [--reps 7] [--steps 20]
"""

import argparse
import statistics
import time

import jax
import numpy as np

from parallel import devices, mesh as meshes, rules
from train import config as configs, optim, state as states, step as steps

NANOGPT = ("nanoGPT (configs/shakespeare_char.yaml)", [])
LARGE = (
    "large (L4 D512 N8 F1408 T256 B8)",
    ["model.d_model=512", "model.num_heads=8", "model.num_kv_heads=8", "model.mlp_dim=1408",
     "data.seq_len=256", "train.batch_size=8"],
)
VOCAB = 65  # the character vocabulary of tiny-shakespeare


def load_config(overrides: list[str], num_devices: int) -> configs.Config:
    return configs.load(
        "configs/shakespeare_char.yaml", [f"mesh.devices={num_devices}", f"model.vocab_size={VOCAB}", *overrides]
    )


def time_train_step(cfg: configs.Config, reps: int, n_steps: int) -> list[float]:
    """Seconds per step of each repetition."""
    mesh = meshes.build_mesh(cfg.mesh)
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, mesh)
    train_step = steps.make_train_step(lay, tx, cfg.train)
    state = states.init_state(cfg.model, tx, lay, cfg.train.seed)
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    sharding = rules.batch_sharding(mesh)
    batches = [
        {k: jax.device_put(rng.integers(0, VOCAB, (b, t), dtype=np.int32), sharding) for k in ("inputs", "targets")}
        for _ in range(4)
    ]
    state, out = train_step(state, batches[0])  # compile
    jax.block_until_ready((state, out))
    for i in range(3):  # warm up
        state, out = train_step(state, batches[i % 4])
    jax.block_until_ready((state, out))
    per_step = []
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(n_steps):
            state, out = train_step(state, batches[i % 4])
        jax.block_until_ready((state, out))
        per_step.append((time.perf_counter() - start) / n_steps)
    return per_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="repetitions per shape (median reported)")
    p.add_argument("--steps", type=int, default=20, help="train steps per repetition")
    p.add_argument("--large-steps", type=int, default=3, help="train steps per repetition at the large shape")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak")
    args = p.parse_args(argv)

    cores = devices.use_cpu_cores()  # before the backend starts
    peaks = [devices.measure_matmul_peak(n=1024, seconds=args.peak_seconds)]
    print(f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("FLOPs per token: PaLM convention, 6 * N_matmul (incl. the V x D head) + 12 * L * N * H * T")
    rows = []
    for (name, overrides), n_steps in ((NANOGPT, args.steps), (LARGE, args.large_steps)):
        batch = load_config(overrides, 1).train.batch_size
        per_core = devices.devices_dividing(batch, cores)  # as `podtrain pretrain` picks
        layouts = [("1 device", 1)] + ([(f"{per_core} devices, one per core", per_core)] if per_core > 1 else [])
        for layout, num_devices in layouts:
            cfg = load_config(overrides, num_devices)
            rows.append((f"{name}, {layout}", cfg, time_train_step(cfg, args.reps, n_steps)))
            # the machine's speed drifts: the peak is re-measured between layouts and the best
            # of all is the MFU's denominator (a low peak would flatter every MFU)
            peaks.append(devices.measure_matmul_peak(n=1024, seconds=args.peak_seconds))
    peak = max(peaks)
    print(
        f"measured f32 matmul peak (1024^3, best of {args.peak_seconds:g} s, {len(peaks)} times through the run): "
        f"{peak / 1e9:.1f} GFLOP/s (each: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})"
    )
    for label, cfg, per_step in rows:
        tokens = cfg.train.batch_size * cfg.data.seq_len
        med = statistics.median(per_step)
        tok_s = tokens / med
        spread = f"{tokens / max(per_step):,.0f}..{tokens / min(per_step):,.0f}"
        flops = cfg.model.flops_per_token(cfg.data.seq_len)
        print(
            f"{label}: {med * 1e3:.2f} ms/step, {tok_s:,.0f} tokens/s (range {spread} over {args.reps} reps), "
            f"{flops / 1e6:.2f} MFLOP/token, MFU {tok_s * flops / peak:.1%}"
        )

if __name__ == "__main__":
    main()
