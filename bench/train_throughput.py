"""Training-step throughput and MFU at the nanoGPT shape and at two larger shapes.

Times the real train step (`train.step.make_train_step` over `train.state.layout`: the sharded
jit path), compile excluded, on device-resident random batches. Each repetition times `--steps`
back-to-back steps; the figure is the median over `--reps`. Two layouts per shape: one CPU device
(XLA threads each op over the cores) and one device per core with the batch data-parallel over
them. `podtrain pretrain` takes the second below d_model 512 and the first from there on
(parallel/devices.py: use_cpu_cores); its row is marked, and the last lines hold it against the
targets (>= 20k tokens/s at the nanoGPT shape, MFU >= 55% at the larger shape).

MFU = achieved FLOP/s / measured f32 matmul peak of this machine (the best of several
measurements spread through the run), with the FLOPs of
`ModelConfig.flops_per_token` (PaLM convention: 6 * N_matmul + 12 * L * N * H * T).

Two more figures put that peak in context on a noisy shared host:
- the 1024^3 matmul's median FLOP/s on one thread, on all threads of one device, and on one
  device per core at once, measured alternately: whether the cores add matmul throughput;
- each row's step FLOP/s as a share of a plain matmul loop's FLOP/s measured right after each
  repetition, for as long (median over reps): the step against the matmul rate the host gave in
  the same minute, where the best-of peak is a short burst the host rarely sustains.

The larger shapes are 4 layers at d_model 512 and 1024 (T 256, batch 8). A step's FLOP/s rise
with d_model: its matmuls (2048 tokens x d_model x d_model..mlp_dim) come closer to the 1024^3
one that sets the peak, and the per-layer elementwise work shrinks against them.

    python bench/train_throughput.py [--reps 7] [--steps 20] [--shapes nanogpt,large,larger]
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from podtrain.parallel import devices, rules
from podtrain.parallel import mesh as meshes
from podtrain.train import config as configs
from podtrain.train import optim
from podtrain.train import state as states
from podtrain.train import step as steps

NANOGPT = ("nanoGPT (configs/shakespeare_char.yaml)", [])
LARGE = (
    "large (L4 D512 N8 F1408 T256 B8)",
    [
        "model.d_model=512",
        "model.num_heads=8",
        "model.num_kv_heads=8",
        "model.mlp_dim=1408",
        "data.seq_len=256",
        "train.batch_size=8",
    ],
)
# d_model 1024: the matmuls of a step come closer in size to the 1024^3 one that sets the peak
LARGER = (
    "larger (L4 D1024 N16 F2816 T256 B8)",
    [
        "model.d_model=1024",
        "model.num_heads=16",
        "model.num_kv_heads=16",
        "model.mlp_dim=2816",
        "data.seq_len=256",
        "train.batch_size=8",
    ],
)
SHAPES = {"nanogpt": NANOGPT, "large": LARGE, "larger": LARGER}
TARGETS = {"nanogpt": ("tokens/s", 20_000), "large": ("MFU", 0.55), "larger": ("MFU", 0.55)}
VOCAB = 65  # the character vocabulary of tiny-shakespeare


def load_config(overrides: list[str], num_devices: int) -> configs.Config:
    return configs.load(
        "configs/shakespeare_char.yaml", [f"mesh.devices={num_devices}", f"model.vocab_size={VOCAB}", *overrides]
    )


MATMUL_N = 1024


@functools.cache
def _matmul(single_thread: bool, mesh=None):
    opts = {"xla_cpu_multi_thread_eigen": False} if single_thread else None
    if mesh is None:
        a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
        return jax.jit(lambda x, y: x @ y, compiler_options=opts), (a, a), 1
    rows = NamedSharding(mesh, P("d"))
    x = jax.device_put(np.ones((mesh.size * MATMUL_N, MATMUL_N), np.float32), rows)
    w = jax.device_put(np.ones((MATMUL_N, MATMUL_N), np.float32), NamedSharding(mesh, P()))
    return jax.jit(lambda x, y: x @ y, compiler_options=opts, out_shardings=rows), (x, w), mesh.size


def matmul_rate(seconds: float, single_thread: bool = False, mesh=None) -> float:
    """FLOP/s of back-to-back 1024^3 matmuls over about `seconds`, all of them (not the best);
    with `mesh`, one per device of it at once."""
    f, args, copies = _matmul(single_thread, mesh)
    jax.block_until_ready(f(*args))
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        jax.block_until_ready(f(*args))
        count += 1
    return copies * count * 2 * MATMUL_N**3 / (time.perf_counter() - start)


def matmul_scaling(cores: int, rounds: int = 15, seconds: float = 0.05) -> dict[str, float]:
    """Median matmul FLOP/s per way of running it, the ways measured alternately."""
    ways = {"1 thread": (True, None), "all threads of 1 device": (False, None)}
    if cores > 1:
        mesh = jax.make_mesh((cores,), ("d",), axis_types=(AxisType.Auto,))
        ways[f"{cores} devices at once, 1 thread each"] = (True, mesh)
    rates = {way: [] for way in ways}
    for _ in range(rounds):
        for way, (single, mesh) in ways.items():
            rates[way].append(matmul_rate(seconds, single, mesh))
    return {way: statistics.median(r) for way, r in rates.items()}


def time_train_step(cfg: configs.Config, reps: int, n_steps: int) -> tuple[list[float], list[float]]:
    """Seconds per step of each repetition, and the matmul FLOP/s measured right after each one
    for as long as it took."""
    mesh = meshes.build_mesh(cfg.mesh)
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, mesh)
    train_step = steps.make_train_step(lay, tx, cfg.train, cfg.model)
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
    per_step, matmul = [], []
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(n_steps):
            state, out = train_step(state, batches[i % 4])
        jax.block_until_ready((state, out))
        elapsed = time.perf_counter() - start
        per_step.append(elapsed / n_steps)
        matmul.append(matmul_rate(elapsed))
    return per_step, matmul


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="repetitions per shape (median reported)")
    p.add_argument("--steps", type=int, default=20, help="train steps per repetition")
    p.add_argument("--large-steps", type=int, default=3, help="train steps per repetition at the larger shapes")
    p.add_argument("--shapes", default="nanogpt,large,larger", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak")
    args = p.parse_args(argv)

    cores = devices.use_cpu_cores()  # before the backend starts
    peaks = [devices.measure_matmul_peak(n=1024, seconds=args.peak_seconds)]
    print(f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("FLOPs per token: PaLM convention, 6 * N_matmul (incl. the V x D head) + 12 * L * N * H * T")
    rows = []
    for key in args.shapes.split(","):
        name, overrides = SHAPES[key]
        n_steps = args.steps if key == "nanogpt" else args.large_steps
        base = load_config(overrides, 1)
        per_core = devices.devices_dividing(base.train.batch_size, cores)
        pretrain = devices.cpu_device_count(base.train.batch_size, cores, base.model.d_model)
        layouts = [("1 device", 1)] + ([(f"{per_core} devices, one per core", per_core)] if per_core > 1 else [])
        for layout, num_devices in layouts:
            cfg = load_config(overrides, num_devices)
            mark = " [podtrain pretrain's layout]" if num_devices == pretrain else ""
            rows.append(
                (
                    key,
                    num_devices == pretrain,
                    f"{name}, {layout}{mark}",
                    cfg,
                    *time_train_step(cfg, args.reps, n_steps),
                )
            )
            # the machine's speed drifts: the peak is re-measured between layouts and the best
            # of all is the MFU's denominator (a low peak would flatter every MFU)
            peaks.append(devices.measure_matmul_peak(n=1024, seconds=args.peak_seconds))
    peak = max(peaks)
    print(
        f"measured f32 matmul peak (1024^3, best of {args.peak_seconds:g} s, {len(peaks)} times through the run): "
        f"{peak / 1e9:.1f} GFLOP/s (each: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})"
    )
    scaling = matmul_scaling(cores)
    print(
        "f32 matmul 1024^3, median FLOP/s of each way, measured alternately: "
        + ", ".join(f"{way} {rate / 1e9:.0f} G" for way, rate in scaling.items())
    )
    pretrain_rows = {}
    for key, is_pretrain, label, cfg, per_step, matmul in rows:
        tokens = cfg.train.batch_size * cfg.data.seq_len
        med = statistics.median(per_step)
        tok_s = tokens / med
        spread = f"{tokens / max(per_step):,.0f}..{tokens / min(per_step):,.0f}"
        flops = cfg.model.flops_per_token(cfg.data.seq_len)
        step_flops = tokens * flops / np.array(per_step)
        print(
            f"{label}: {med * 1e3:.2f} ms/step, {tok_s:,.0f} tokens/s (range {spread} over {args.reps} reps), "
            f"{flops / 1e6:.2f} MFLOP/token, MFU {tok_s * flops / peak:.1%}; "
            f"{np.median(step_flops / np.array(matmul)):.1%} of the matmul loop's FLOP/s right after each rep"
        )
        if is_pretrain:
            pretrain_rows[key] = {"tokens/s": tok_s, "MFU": tok_s * flops / peak}
    for key, (metric, floor) in TARGETS.items():
        if key in pretrain_rows:
            got = pretrain_rows[key]
            shown = f"{floor:.0%}" if metric == "MFU" else f"{floor:,}"
            print(
                f"target {SHAPES[key][0]} at pretrain's layout, {metric} >= {shown}: "
                f"{got['tokens/s']:,.0f} tokens/s, MFU {got['MFU']:.1%} -> "
                f"{'met' if got[metric] >= floor else 'not met'}"
            )


if __name__ == "__main__":
    main()
