"""`podtrain plan`: compile the real train step for a TPU slice on this machine, before paying.

For a topology such as v5p-256 (and `num_slices` copies of it over DCN) the train step of
train/step.py is lowered and compiled by libtpu's compiler against compile-only devices, with
the config's mesh, remat policy and global batch, and the layers in a `lax.scan` as they run on
TPUs (model.scan_layers=auto). From the compiled executable:

- memory per chip (`memory_analysis`): arguments (state + batch), outputs, the part of the
  outputs aliased to donated arguments, temporaries and code. Peak estimate:
  arguments + outputs - aliased + temporaries + code, against the chip's HBM.
- FLOPs and HBM bytes per chip per step (`cost_analysis`). XLA's cost analysis counts the body
  of a while loop once, and the layers run in a `lax.scan`, so L - 1 more layer bodies are added,
  one body's cost measured by two extra compiles of the same step with 1 and 2 layers unrolled:
  F = F_scanned + (L - 1) * (F_2 layers - F_1 layer).
- Two FLOP counts side by side: the compiled one above and the analytic model FLOPs (6N +
  attention, model/config.py, as the training loop reports it). They should differ by the remat
  recompute (full remat runs the forward twice: 8N/6N) and a little non-matmul work; a larger gap
  is printed as a warning with its likely cause, never hidden in the MFU.
- MoE on TPU: `ragged_dot` compiles to a Mosaic kernel whose grid is data dependent (it visits
  only the row tiles its groups fill), but cost analysis charges the kernel's static estimate,
  i.e. every row of its buffer. The dropless expert-parallel exchange hands each device a buffer
  of `expert` x its own pairs, so cost analysis charges ep x the routed rows (measured: a MoE
  layer alone, ep=4, forward 4.0x the analytic FLOPs). The step-time estimate therefore charges
  each ragged_dot kernel for the rows balanced routing fills (this chip's token x top_k pairs,
  plus one row tile per local expert). The weight gradient of ragged_dot is a different story:
  XLA lowers it to a dense, masked batched matmul over every local expert and every buffer row,
  work the TPU really does, so it stays charged in full.
- step time: a roofline lower bound, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip,
  with published peaks (parallel/devices.py), from the compiled FLOPs (with the ragged_dot
  correction): they include remat recompute and whatever the compiled program really does. It
  ignores ICI/DCN collectives and assumes perfect overlap and full MXU use, so real steps are
  slower; MFU is model FLOPs / (chips * peak * step time), hence an upper bound as well.

`search` compiles candidate layouts (mesh degrees x remat policies) the same way and ranks those
that fit by the estimated step time.
"""

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from podtrain.model.config import REMAT_POLICIES
from podtrain.parallel import devices as chips
from podtrain.parallel import mesh as meshes
from podtrain.parallel import rules
from podtrain.parallel.config import AXES
from podtrain.plan import topology
from podtrain.train import config as configs
from podtrain.train import optim, validate
from podtrain.train import state as states
from podtrain.train import step as steps
from podtrain.train.config import Config, ConfigError

GiB = 2**30
# The TPU compiler's out-of-memory messages: "... Used 130.5G of 95.74G hbm ..." or "... the total
# memory required for HLO temporaries (70.46G) exceeds available HBM (15.75G)".
OOM = (
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
    re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"),
)
UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# A ragged_dot Mosaic kernel in compiled TPU HLO: `%name = f32[ROWS,N]{...} custom-call(...)` with a
# ragged_dot_tiling attribute ("tile rows,tile k,tile n") and the kernel's static cost estimate.
RAGGED_KERNEL = re.compile(
    r"= \w+\[(\d+),\d+\]\S* custom-call\(.*ragged_dot_tiling=\"(\d+),.*\"cost_estimate\":\{\"flops\":\"(\d+)\""
)
# compiled FLOPs / model FLOPs outside this band is reported as a disagreement: full remat runs
# the forward twice (8N / 6N = 1.33) and softmax, norms and the optimizer add a few percent.
AGREE = (0.8, 1.6)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per chip from `memory_analysis`."""

    arguments: float
    outputs: float
    aliased: float
    temporaries: float
    code: float

    @property
    def total(self) -> float:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(
            m.argument_size_in_bytes,
            m.output_size_in_bytes,
            m.alias_size_in_bytes,
            m.temp_size_in_bytes,
            m.generated_code_size_in_bytes,
        )


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """The TPU compiler refused: it needed `needed` bytes of the `available` per chip."""

    needed: float
    available: float
    message: str


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One layout's figures on one topology (per chip unless named otherwise)."""

    mesh: dict[str, int]  # ICI degrees
    dcn: dict[str, int]
    remat: str
    device_kind: str
    chips: int
    hbm: float
    memory: Memory | None  # None when the compiler refused (see oom)
    oom: OutOfMemory | None
    flops: float  # per chip per step: loop-corrected cost analysis, ragged_dot kernels at balanced routing
    cost_analysis_flops: float  # the same, every ragged_dot kernel charged for its whole buffer
    bytes_accessed: float
    model_flops: float  # per step, all chips
    peak_flops: float
    hbm_bandwidth: float
    compile_s: float

    @property
    def needed(self) -> float:
        return self.memory.total if self.memory else self.oom.needed

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.hbm

    @property
    def step_flops(self) -> float:
        """FLOPs per chip the step time is computed from: the compiled ones, unless they fall below
        the model count (work the cost analysis cannot see, e.g. library calls), then the model's."""
        return self.flops if self.flops_ratio >= AGREE[0] else self.model_flops / self.chips

    @property
    def step_s(self) -> float:
        return max(self.step_flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

    @property
    def bound(self) -> str:
        return "compute" if self.step_flops / self.peak_flops >= self.bytes_accessed / self.hbm_bandwidth else "HBM"

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.chips * self.peak_flops * self.step_s)

    @property
    def flops_ratio(self) -> float:
        """Compiled FLOPs (all chips) / model FLOPs."""
        return self.flops * self.chips / self.model_flops

    @property
    def agrees(self) -> bool:
        return AGREE[0] <= self.flops_ratio <= AGREE[1]

    @property
    def layout(self) -> str:
        dcn = {k: v for k, v in self.dcn.items() if v > 1}
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        return mesh + (" dcn:" + ",".join(f"{k}={v}" for k, v in dcn.items()) if dcn else "") + f" remat={self.remat}"


def state_bytes_per_chip(cfg: Config, mesh) -> float:
    """Bytes of parameters + optimizer state on the most loaded chip, from the shardings alone."""
    lay = states.layout(cfg.model, optim.optimizer(cfg.train), mesh)
    leaves = jax.tree.leaves(lay.abstract)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


def _plan_config(cfg: Config, num_slices: int) -> Config:
    """The config as it would run on the pod: layers scanned, attention in one block, dropless MoE
    with ragged_dot, DCN degrees covering the slices."""
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size=0: plan needs an explicit vocabulary size (e.g. 128256)")
    if cfg.mesh.devices:
        raise ConfigError(f"mesh.devices={cfg.mesh.devices}: plan uses every chip of the topology; set it to 0")
    scan = "scan" if cfg.model.scan_layers == "auto" else cfg.model.scan_layers
    impl = cfg.model.moe.dropless_impl
    ragged = "ragged" if impl == "auto" else impl  # TPU's choice of "auto"
    blocks = cfg.model.attention_blocks or 1  # "auto" cuts attention into blocks only on CPU
    model = {"scan_layers": scan, "attention_blocks": blocks, "moe": {"dropless_impl": ragged}}
    return configs.replace(topology.with_slices(cfg, num_slices), model=model)


def compile_step(cfg: Config, devs):
    """The compiled train step of `cfg` on `devs` (compile-only devices work)."""
    mesh = validate.build_mesh(cfg, devs)
    tx = optim.optimizer(cfg.train)
    lay = states.layout(cfg.model, tx, mesh)
    train_step = steps.make_train_step(lay, tx, cfg.train, cfg.model)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rules.batch_sharding(mesh)) for k in ("inputs", "targets")
    }
    return train_step.lower(lay.abstract, batch).compile(), mesh


def _compile_or_oom(cfg: Config, devs):
    """(compiled, None) or (None, OutOfMemory) when the compiler runs out of HBM."""
    try:
        return compile_step(cfg, devs)[0], None
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        m = next((m for pattern in OOM if (m := pattern.search(text))), None)
        if "RESOURCE_EXHAUSTED" not in text or not m:
            raise
        line = next(line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line)
        return None, OutOfMemory(float(m.group(1)) * UNITS[m.group(2)], float(m.group(3)) * UNITS[m.group(4)], line)


def routed_rows_per_chip(cfg: Config, devs) -> tuple[float, int]:
    """(token x expert pairs one chip routes per MoE layer, experts per chip); (0, 0) for dense.
    The batch is split over every mesh axis but `tensor` (parallel/rules.py)."""
    moe = cfg.model.moe
    if not moe.enabled:
        return 0.0, 0
    ici, dcn = meshes.resolve_degrees(cfg.mesh, len(devs))
    degree = {axis: i * d for axis, i, d in zip(AXES, ici, dcn)}
    shards = len(devs) // degree["tensor"]
    pairs = cfg.train.batch_size * cfg.data.seq_len * moe.top_k / shards
    return pairs, max(1, moe.num_experts // degree["expert"])


def ragged_kernels(hlo_text: str) -> list[tuple[int, int, float]]:
    """(buffer rows, row tile, charged FLOPs) of every ragged_dot kernel in compiled TPU HLO."""
    return [(int(r), int(t), float(f)) for r, t, f in RAGGED_KERNEL.findall(hlo_text)]


def _hlo_cost(compiled) -> dict:
    """XLA's HLO cost analysis of the optimized module, run by the host (CPU) client: for
    compile-only GPU executables, whose own cost_analysis() is empty. jax has no public entry
    point for it; `Lowered.cost_analysis` uses the same function on the unoptimized module."""
    from jax._src.lib import _jax

    (module,) = compiled.runtime_executable().hlo_modules()
    return _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)


def _cost(compiled, routed: tuple[float, int] = (0.0, 0)) -> tuple[float, float, float]:
    """(FLOPs with ragged_dot kernels at the rows `routed` fills, cost-analysis FLOPs, bytes).
    `routed`: `routed_rows_per_chip`; (0, 0) leaves every kernel charged in full."""
    cost = compiled.cost_analysis() or _hlo_cost(compiled)
    cost = cost[0] if isinstance(cost, list) else cost
    flops, bytes_ = cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)
    pairs, local_experts = routed
    balanced = flops
    if pairs:
        for rows, tile, charged in ragged_kernels(compiled.as_text()):
            filled = min(rows, pairs + local_experts * tile)  # each expert's last tile is partly empty
            balanced -= charged * (1 - filled / rows)
    return balanced, flops, bytes_


def _shallow(cfg: Config, layers: int) -> Config:
    return configs.replace(cfg, model={"num_layers": layers, "scan_layers": "unroll"})


def layer_cost(cfg: Config, devs) -> tuple[float, float, float]:
    """`_cost` per chip of one more layer: 2-layer minus 1-layer compile, both unrolled."""
    (c1, _), (c2, _) = (_compile_or_oom(_shallow(cfg, k), devs) for k in (1, 2))
    if not (c1 and c2):
        return math.nan, math.nan, math.nan
    routed = routed_rows_per_chip(cfg, devs)
    return tuple(b - a for a, b in zip(_cost(c1, routed), _cost(c2, routed)))


def estimate(cfg: Config, devs, per_layer=None) -> Estimate:
    """Figures of `cfg`'s layout on `devs`: the full-depth compile, with the scanned layer body's
    cost counted num_layers times. `per_layer`: `layer_cost`'s result, or a function returning
    it, called only when the layout compiles (computed here if not given)."""
    t0 = time.perf_counter()
    compiled, oom = _compile_or_oom(cfg, devs)
    flops = charged = bytes_ = 0.0
    if compiled:
        per_layer = per_layer or layer_cost(cfg, devs)
        per_layer = per_layer() if callable(per_layer) else per_layer
        whole, extra = _cost(compiled, routed_rows_per_chip(cfg, devs)), cfg.model.num_layers - 1
        flops, charged, bytes_ = (w + extra * p for w, p in zip(whole, per_layer))
        flops, charged, bytes_ = (0.0, 0.0, 0.0) if math.isnan(flops) else (flops, charged, bytes_)
    kind = devs[0].device_kind
    mesh, _ = meshes.resolve_degrees(cfg.mesh, len(devs))
    return Estimate(
        mesh=dict(zip(AXES, mesh)),
        dcn=dict(zip(AXES, cfg.mesh.dcn)),
        remat=cfg.model.remat,
        device_kind=kind,
        chips=len(devs),
        hbm=chips.published(chips.PUBLISHED_HBM, kind) or math.inf,
        memory=Memory.of(compiled) if compiled else None,
        oom=oom,
        flops=flops,
        cost_analysis_flops=charged,
        bytes_accessed=bytes_,
        model_flops=cfg.model.flops_per_token(cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len,
        peak_flops=chips.published(chips.PUBLISHED_PEAK, kind),
        hbm_bandwidth=chips.published(chips.PUBLISHED_HBM_BANDWIDTH, kind),
        compile_s=time.perf_counter() - t0,
    )


def plan(cfg: Config, topology_name: str, num_slices: int = 1, log=print) -> Estimate:
    """Compile `cfg` for `num_slices` slices of `topology_name` and report its figures."""
    sl = topology.parse_target(topology_name)
    cfg = _plan_config(cfg, num_slices)
    devs = topology.devices(sl, num_slices)
    log(f"compiling for {num_slices} x {sl.describe}, {len(devs)} chips of {devs[0].device_kind} ...")
    validate.build_mesh(cfg, devs)  # ConfigError when the mesh or batch does not suit the topology
    est = estimate(cfg, devs)
    log(report(est, cfg))
    return est


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def report(est: Estimate, cfg: Config) -> str:
    gib = lambda x: f"{x / GiB:,.2f} GiB"  # noqa: E731
    lines = [f"layout: {est.layout} on {est.chips} chips ({est.device_kind})"]
    if est.memory:
        m = est.memory
        lines += [
            f"memory per chip: arguments {gib(m.arguments)}, outputs {gib(m.outputs)} "
            f"(aliased {gib(m.aliased)}), temporaries {gib(m.temporaries)}, code {gib(m.code)}",
            f"  total {gib(m.total)} of {gib(est.hbm)} HBM ({m.total / est.hbm:.0%})",
        ]
    if est.fits:
        lines.append("fits: yes")
    elif est.memory:
        lines.append(
            f"DOES NOT FIT: needs {gib(est.needed)} per chip, HBM is {gib(est.hbm)} "
            f"(over by {gib(est.needed - est.hbm)})"
        )
    else:
        lines += [
            f"DOES NOT FIT: the TPU compiler needs {gib(est.oom.needed)} per chip, {gib(est.oom.available)} of "
            f"HBM is available (over by {gib(est.oom.needed - est.oom.available)})",
            f"  compiler: {est.oom.message.strip()}",
        ]
    if est.flops:
        tokens = cfg.train.batch_size * cfg.data.seq_len
        lines += flops_lines(est, cfg)
        lines += [
            f"HBM bytes per step per chip: {est.bytes_accessed:.3e}",
            f"estimated step time {_seconds(est.step_s)} ({est.bound}-bound roofline of the compiled FLOPs at "
            f"{est.peak_flops / 1e12:.0f} TFLOP/s and {est.hbm_bandwidth / 1e9:.0f} GB/s per chip; "
            f"a lower bound: collectives and imperfect overlap not included)",
            f"  {tokens / est.step_s:,.0f} tokens/s, MFU {est.mfu:.1%} (model FLOPs / peak; upper bound)",
        ]
    lines.append(f"compile time {est.compile_s:.0f} s")
    return "\n".join(lines)


def flops_lines(est: Estimate, cfg: Config) -> list[str]:
    """Compiled and analytic FLOPs side by side, which one the estimate uses, and any disagreement."""
    lines = [
        f"FLOPs per step, all chips: compiled {est.flops * est.chips:.3e} ({est.flops:.3e} per chip; cost analysis, "
        f"loop-corrected), model {est.model_flops:.3e} (6N + attention): compiled / model = {est.flops_ratio:.2f}"
    ]
    if est.cost_analysis_flops > 1.01 * est.flops:
        lines.append(
            f"  cost analysis alone says {est.cost_analysis_flops * est.chips:.3e}: it charges each ragged_dot "
            f"kernel for its whole buffer; the kernels only visit the rows routing fills, so the compiled figure "
            f"above charges them for balanced routing (tokens x top_k per chip)"
        )
    if est.step_flops == est.flops:
        lines.append(
            f"  step time uses the compiled FLOPs (they include remat={cfg.model.remat} recompute and what the "
            f"compiled program really runs); MFU divides the model FLOPs by it"
        )
    else:
        lines.append("  step time uses the model FLOPs: the compiled count is below them, so it misses work")
    if not est.agrees:
        lines.append(
            f"  WARNING: compiled FLOPs are {est.flops_ratio:.2f}x the model FLOPs, outside the {AGREE[0]}-{AGREE[1]}x "
            f"that remat recompute explains: {_disagreement(est, cfg)}"
        )
    return lines


def _disagreement(est: Estimate, cfg: Config) -> str:
    if est.flops_ratio < AGREE[0]:
        return (
            "the compiled program does less than the model count (e.g. ops the cost analysis does not count, "
            "such as library calls); the step time is too optimistic"
        )
    moe = cfg.model.moe
    if moe.enabled and moe.dispatch == "capacity":
        return (
            "capacity dispatch computes every expert's E x C slots, filled or not (capacity_factor x the "
            "routed rows); the estimate keeps that work"
        )
    if moe.enabled and est.device_kind.startswith("TPU"):
        return (
            "on TPU the weight gradient of lax.ragged_dot compiles to a dense masked matmul over every local "
            "expert and every row of the expert buffer (with expert parallelism that buffer holds `expert` x the "
            "routed rows), so the backward pass really does this extra work and the estimate keeps it "
            "(megablox gmm's weight gradient, jax.experimental.pallas.ops.tpu.megablox, costs 1x)"
        )
    return "the compiled program does work the model count leaves out; the estimate keeps it"


def candidates(cfg: Config, chips_per_slice: int) -> list[dict[str, int]]:
    """Mesh degrees to try: tensor (dividing the heads) x expert (dividing the experts) with the
    rest of each slice FSDP, plus plain data parallelism."""
    experts = cfg.model.moe.num_experts or 1
    out = [{"data": chips_per_slice, "fsdp": 1, "expert": 1, "tensor": 1}]
    for tensor in (1, 2, 4, 8):
        if chips_per_slice % tensor or cfg.model.num_heads % tensor or cfg.model.mlp_dim % tensor:
            continue
        for expert in (e for e in (1, 2, 4, 8, 16, 32, 64) if e <= experts and experts % e == 0):
            rest, rem = divmod(chips_per_slice, tensor * expert)
            if not rem:
                out.append({"data": 1, "fsdp": rest, "expert": expert, "tensor": tensor})
    return [c for i, c in enumerate(out) if c not in out[:i]]


FASTEST_FIRST = ("none", "dots", "dots_no_batch", "full")  # remat policies, least recompute first
assert sorted(FASTEST_FIRST) == sorted(REMAT_POLICIES)


def search(cfg: Config, topology_name: str, num_slices: int = 1, log=print) -> list[Estimate]:
    """Try layouts (mesh degrees x remat policies); rank those that fit by estimated step time.

    Every candidate is compiled at full depth. Per mesh, remat policies go from the fastest and
    the first that fits ends that mesh (slower policies would rank below it). Meshes whose
    parameters and optimizer state alone exceed HBM are skipped without compiling. The per-layer
    cost (two small compiles) is measured once per remat policy, on the first layout of that
    policy that fits (layouts that do not fit need no FLOPs).
    Returns every estimate, best first.
    """
    sl = topology.parse_target(topology_name)
    cfg = _plan_config(cfg, num_slices)
    devs = topology.devices(sl, num_slices)
    hbm = chips.published(chips.PUBLISHED_HBM, devs[0].device_kind) or math.inf
    log(
        f"searching layouts for {num_slices} x {sl.accelerator_type} ({len(devs)} chips of {devs[0].device_kind}, "
        f"{hbm / GiB:.1f} GiB HBM each) ..."
    )
    results, per_layer = [], {}
    for degrees in candidates(cfg, len(devs) // num_slices):
        mesh_cfg = configs.replace(cfg, mesh=degrees)
        try:
            mesh = validate.build_mesh(mesh_cfg, devs)
        except ConfigError as e:
            log(f"  skip {degrees}: {e}")
            continue
        state = state_bytes_per_chip(mesh_cfg, mesh)
        if state > hbm:
            log(f"  skip {degrees}: parameters + optimizer state alone need {state / GiB:.2f} GiB per chip")
            continue
        for remat in FASTEST_FIRST:
            one = configs.replace(mesh_cfg, model={"remat": remat})

            def cost(one=one, remat=remat):
                if remat not in per_layer:
                    per_layer[remat] = layer_cost(one, devs)
                return per_layer[remat]

            est = estimate(one, devs, cost)
            step = f"~{_seconds(est.step_s)} per step" if est.flops else ""
            log(f"  {est.layout}: {est.needed / GiB:.2f} GiB per chip, {'fits' if est.fits else 'does not fit'} {step}")
            results.append(est)
            if est.fits:
                break
    ranked = sorted(results, key=lambda e: (not e.fits, e.step_s if e.flops else math.inf))
    log(table(ranked))
    return ranked


def table(ranked: list[Estimate]) -> str:
    head = (
        f"{'rank':>4}  {'data':>4} {'fsdp':>4} {'exp':>4} {'tens':>4}  {'remat':<13} {'GiB/chip':>9} {'HBM':>5}  "
        f"{'fits':<11} {'step':>10} {'MFU':>6}"
    )
    rows = [head]
    for i, e in enumerate(ranked, 1):
        m = e.mesh
        fits = "yes" if e.fits else "no"
        step = _seconds(e.step_s) if e.flops else "?"
        mfu = f"{e.mfu:.1%}" if e.flops else "?"
        rows.append(
            f"{i:>4}  {m['data']:>4} {m['fsdp']:>4} {m['expert']:>4} {m['tensor']:>4}  {e.remat:<13} "
            f"{e.needed / GiB:>9.2f} {e.needed / e.hbm:>5.0%}  {fits:<11} {step:>10} {mfu:>6}"
        )
    return "\n".join(rows)
