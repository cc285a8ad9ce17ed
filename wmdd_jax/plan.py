"""Stage ``plan``: every stage's programs compiled for a target (a TPU slice, GPUs, CPUs) before a run.

``python -m wmdd_jax plan --config=C --workdir=DIR --target=TARGET`` compiles, at the config's real
shapes and without data or weights, what each stage runs per step on the target's devices (JAX compiles
for devices it does not have: `jax.experimental.topologies`), and prints per stage: whether it fits
(per-device peak memory against the device's), FLOPs and bytes per step, the number of steps, a roofline
estimate (the slower of FLOPs at the device's peak and bytes at its memory bandwidth; the peak figures
are printed) and the compile time. ``DIR/plan.json`` holds the same records. These are estimates of
compiled programs, not measured times on the target.

Targets: ``tpu:<topology>`` (``tpu:v5e:4x4``, ``tpu:v4:2x2x2``, ``tpu:v4:2x2x2:megacore``,
``tpu:v5p:2x2x2``, ``tpu:v6e:4x4``: needs libtpu, the ``tpu`` extra), ``gpu:<card>:<count>`` (needs the
``cuda`` extra) and ``cpu:<count>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wmdd_jax import files, placement, sharding
from wmdd_jax.distill.loss import SynthesisState, Targets, chunk_classes, class_layout, make_synthesis_step
from wmdd_jax.distill.targets import class_barycenters_on
from wmdd_jax.errors import UserError
from wmdd_jax.host import tpu_present
from wmdd_jax.models import BN_STATS, collect_bn_moments
from wmdd_jax.optim import make_optimizer
from wmdd_jax.teacher import model_from_spec, precision
from wmdd_jax.train_step import Teacher, TrainState, batch_plan, init_variables, make_train_step

PLAN_FILE = "plan.json"
GIB = 2**30

# Per device (a TPU chip, or a v4 core outside megacore mode; a GPU): memory in bytes, dense bf16 peak
# FLOP/s (float32 matmuls at default precision run one bf16 pass on TPU and TF32 on H100/A100), HBM
# bandwidth in bytes/s. Public vendor figures.
TPU_CHIPS = {
    "v4": (32 * GIB, 275e12, 1228e9, "TPU v4: 275 TFLOP/s bf16, 1228 GB/s, 32 GiB per chip"),
    "v5e": (16 * GIB, 197e12, 819e9, "TPU v5e: 197 TFLOP/s bf16, 819 GB/s, 16 GiB per chip"),
    "v5p": (95 * GIB, 459e12, 2765e9, "TPU v5p: 459 TFLOP/s bf16, 2765 GB/s, 95 GiB per chip"),
    "v6e": (32 * GIB, 918e12, 1640e9, "TPU v6e: 918 TFLOP/s bf16, 1640 GB/s, 32 GiB per chip"),
}
class Gpu(NamedTuple):
    memory: int                 # bytes
    flops: float                # dense TF32 FLOP/s (XLA's default for float32 matmuls on these cards)
    bandwidth: float            # HBM bytes/s
    source: str
    capability: str             # CUDA compute capability
    cores: int                  # streaming multiprocessors
    l2: int                     # L2 cache bytes


GPUS = {
    "h100": Gpu(80 * 10**9, 494e12, 3350e9, "H100 SXM: 494 TFLOP/s TF32 dense, 3350 GB/s, 80 GB", "9.0", 132, 50 * 2**20),
    "h200": Gpu(141 * 10**9, 494e12, 4800e9, "H200 SXM: 494 TFLOP/s TF32 dense, 4800 GB/s, 141 GB", "9.0", 132,
                50 * 2**20),
    "a100": Gpu(80 * 10**9, 156e12, 2039e9, "A100 80GB SXM: 156 TFLOP/s TF32 dense, 2039 GB/s, 80 GB", "8.0", 108,
                40 * 2**20),
}

DATASETS = {  # name: (training images, channels); facts of the datasets, for planning without the data
    "fashion_mnist": (60000, 1), "cifar10": (50000, 3), "cifar100": (50000, 3), "imagenette": (9469, 3),
    "tiny_imagenet": (100000, 3), "imagenet2012": (1281167, 3),
}


@dataclasses.dataclass
class Target:
    name: str
    platform: str               # cpu | gpu | tpu: the models' kernels follow it
    devices: list
    hosts: int
    device_memory: int          # bytes per device
    peak_flops: float           # per device
    bandwidth: float            # bytes/s per device
    peak_source: str

    def host_devices(self) -> list:
        """The devices of the first host (a stage that runs per host compiles for these)."""
        first = min(d.process_index for d in self.devices)
        return [d for d in self.devices if d.process_index == first]


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu writes warnings to the process's stderr when it describes a topology without a TPU."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def parse_target(text: str) -> Target:
    """A `Target` from ``tpu:<topology>[:megacore]``, ``gpu:<card>:<count>`` or ``cpu:<count>``."""
    kind, _, rest = (text or "").partition(":")
    if kind == "tpu":
        return _tpu_target(text, rest)
    if kind == "gpu":
        return _gpu_target(text, rest)
    if kind == "cpu":
        return _cpu_target(text, rest)
    raise UserError(f"--target must be tpu:<topology> (e.g. tpu:v5e:4x4), gpu:<card>:<count> (cards: "
                    f"{', '.join(GPUS)}) or cpu:<count>; got {text!r}")


def _tpu_target(text: str, rest: str) -> Target:
    parts = rest.split(":")
    megacore = parts[-1] == "megacore"
    topology = ":".join(parts[:-1] if megacore else parts)
    chip = topology.split(":")[0]
    if chip not in TPU_CHIPS or ":" not in topology:
        raise UserError(f"unknown TPU target {text!r}: use tpu:<chip>:<shape>[:megacore] with chip one of "
                        f"{', '.join(TPU_CHIPS)} (e.g. tpu:v5e:4x4, tpu:v4:2x2x2:megacore)")
    try:
        from jax.experimental import topologies
        if not tpu_present():  # compile-only: several processes may load libtpu at once
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        with _quiet_stderr():
            devices = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                   **({"chip_config_name": "megacore"} if megacore else {})).devices
    except Exception as e:  # no libtpu, or a topology libtpu does not know
        raise UserError(f"cannot describe TPU topology {topology!r} ({str(e).splitlines()[0][:200]}); install the "
                        f"compile-only backend with pip install -e '.[tpu]' and check the name") from e
    memory, flops, bandwidth, source = TPU_CHIPS[chip]
    per_chip = max(1, len(devices) // len({tuple(d.coords) for d in devices}))
    if per_chip > 1:  # v4 outside megacore mode: each core is a device with half the chip
        memory, flops, bandwidth = memory // per_chip, flops / per_chip, bandwidth / per_chip
        source += f" (per core: 1/{per_chip} of a chip)"
    return Target(text, "tpu", list(devices), len({d.process_index for d in devices}), memory, flops,
                  bandwidth, source)


def _gpu_target(text: str, rest: str) -> Target:
    card, _, count = rest.partition(":")
    if card not in GPUS or not count.isdigit() or int(count) < 1:
        raise UserError(f"unknown GPU target {text!r}: use gpu:<card>:<count> with card one of {', '.join(GPUS)}")
    memory, flops, bandwidth, source = GPUS[card][:4]
    try:
        from jax.experimental import topologies
        config = _gpu_target_config(card)
        devices = topologies.get_topology_desc(platform="cuda", target_config=config,
                                               topology=f"1x1x{int(count)}").devices
    except Exception as e:
        raise UserError(f"cannot compile for {card} GPUs here ({str(e).splitlines()[0][:200]}); install the "
                        f"compile-only backend with pip install -e '.[cuda]'") from e
    return Target(text, "gpu", list(devices), 1, memory, flops, bandwidth, source)


def _gpu_target_config(card: str) -> str:
    """A ``GpuTargetConfig`` text proto for ``card``: the fields XLA needs to compile for it."""
    gpu = GPUS[card]
    major, minor = gpu.capability.split(".")
    return (f'gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32 '
            f'shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048 '
            f'core_count: {gpu.cores} fpus_per_core: 128 block_dim_limit_x: 2147483647 '
            f'block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {int(gpu.bandwidth)} '
            f'l2_cache_size: {gpu.l2} clock_rate_ghz: 1.755 device_memory_size: {gpu.memory} '
            f'shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: {major} minor: {minor} }} '
            f'registers_per_core_limit: 65536 registers_per_block_limit: 65536 }} '
            f'platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 1 }} '
            f'device_description_str: "{card.upper()}"')


def _cpu_target(text: str, rest: str) -> Target:
    if not rest.isdigit() or int(rest) < 1:
        raise UserError(f"--target cpu:<count> takes a device count, got {text!r}")
    count = int(rest)
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise UserError(f"this process has {len(devices)} CPU devices, not {count}: run it with "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    flops, bandwidth = _measure_cpu()
    cores = os.cpu_count() or 1
    source = (f"this host, measured now: {flops / 1e9:.0f} GFLOP/s float32 matmul, {bandwidth / 1e9:.1f} GB/s "
              f"copy, on {cores} cores, shared by the {count} devices")
    return Target(text, "cpu", devices[:count], 1, _host_memory(), flops / count, bandwidth / count, source)


def _measure_cpu() -> tuple[float, float]:
    """(float32 matmul FLOP/s, copy bytes/s) of this host, best of a few rounds (about a second)."""
    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(5))
    x = np.ones(2**25, np.float32)  # 128 MiB
    y = np.empty_like(x)
    copy = min(_timed(lambda: np.copyto(y, x)) for _ in range(3))
    return 2 * 1024**3 / best, 2 * x.nbytes / copy


def _timed(fn: Callable) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _decode_rate(image_size: int) -> float:
    """Images per second that `wmdd_jax.data.tfds_sources.fit_image` decodes and resizes here, one process,
    from 500x375 JPEGs (ImageNet's typical size)."""
    import io

    from PIL import Image

    from wmdd_jax.data.tfds_sources import fit_image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        fit_image(data, image_size)
        count += 1
    return count / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------
# What each stage compiles, as (lowered program's thunk, steps, note)


def _abstract(tree: Any, shardings: Any) -> Any:
    """``tree``'s shapes as `jax.ShapeDtypeStruct` with ``shardings`` (one sharding, or a matching tree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


class Shapes:
    """The config's shapes without its data: classes, image shape, training-set size."""

    def __init__(self, config):
        from wmdd_jax.data.tfds_sources import SPECS

        name = config.data.name
        if name not in DATASETS:
            raise UserError(f"plan knows the sizes of {', '.join(DATASETS)}; {name!r} is not among them")
        self.num_train, channels = DATASETS[name]
        self.num_classes = SPECS[name].num_classes if name in SPECS else 10
        size = int(config.data.image_size) or (SPECS[name].image_size if name in SPECS else 28)
        self.image_shape = (size, size, channels)
        self.mean = np.zeros(channels, np.float32)
        self.std = np.ones(channels, np.float32)


def _teacher(config, shapes: Shapes, platform: str):
    model = model_from_spec(config.teacher, shapes.num_classes, config.conv_impl, platform)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shapes.image_shape))
    return model, variables


def _training(model, spec, num_examples: int, image_shape, mean, std, mesh: Mesh, hosts: int, runs: int | None,
              teacher=None, config=None):
    """(lowered step of ``runs`` stacked runs (None: one run) of ``spec`` on ``mesh``, steps, layout)."""
    batch, steps = batch_plan(num_examples, spec)
    layout = placement.BatchLayout(mesh, runs, batch, num_processes=hosts)
    tx = make_optimizer(spec, steps)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    state = jax.eval_shape(lambda v: TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                                                batch_stats=v.get("batch_stats", {}),
                                                opt_state=tx.init(v["params"])), variables)
    lead = () if runs is None else (layout.padded_runs,)  # a grid steps copies of the last run too
    if runs is not None:
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct((*lead, *s.shape), s.dtype), state)
    use = layout.mesh if layout.mode != "single" else Mesh(np.asarray(list(mesh.devices.flat)[:1]), ("devices",))
    state_sh = layout.state_sharding or NamedSharding(use, PartitionSpec())
    batch_sh = NamedSharding(use, layout._batch_spec()) if layout.mode != "single" else state_sh
    rep = layout.replicated or state_sh
    step = make_train_step(model, tx, spec, mean, std, Teacher(teacher[0], None) if teacher else None,
                           stacked=runs is not None,
                           out_shardings=(state_sh, rep), precision=precision(config))
    args = (_abstract(state, state_sh),
            jax.ShapeDtypeStruct((*lead, batch, *image_shape), jnp.float32, sharding=batch_sh),
            jax.ShapeDtypeStruct((*lead, batch), jnp.int32, sharding=batch_sh),
            jax.ShapeDtypeStruct((*lead, batch), jnp.float32, sharding=batch_sh),
            jax.ShapeDtypeStruct(lead, jnp.int32, sharding=state_sh if runs is not None else rep),
            _abstract(teacher[1], rep) if teacher else None, None)
    devices = layout.mesh.size if layout.mode != "single" else 1
    return Program(step, args, steps, f"{layout.mode} on {devices} devices, batch {batch}")


def stage_programs(config, target: Target, shapes: Shapes) -> dict:
    """Per stage a `Program` (evaluate: a list of (label, `Program`), one per model and label mode)."""
    platform = target.platform
    mesh = sharding.make_mesh(config.mesh, target.devices)
    host = Mesh(np.asarray(target.host_devices()), ("batch",))
    teacher_model, teacher_vars = _teacher(config, shapes, platform)
    C, m = shapes.num_classes, int(config.ipc)
    out = {}

    # pretrain: the teacher's training step, data parallel over every device.
    out["pretrain"] = _training(teacher_model, config.teacher, shapes.num_train, shapes.image_shape, shapes.mean,
                                shapes.std, mesh, target.hosts, None, config=config)

    # statistics: the teacher's eval pass (features and BN moments), each host over its own devices.
    per_host = host.size
    batch = -(-500 // per_host) * per_host

    def features(variables, x):
        (_, f), state = teacher_model.apply(variables, x, train=False, return_features=True, mutable=[BN_STATS])
        return f, collect_bn_moments(state)

    x_sh = NamedSharding(host, PartitionSpec("batch"))
    args = (_abstract(teacher_vars, NamedSharding(host, PartitionSpec())),
            jax.ShapeDtypeStruct((batch, *shapes.image_shape), jnp.float32, sharding=x_sh))
    steps = math.ceil(shapes.num_train / target.hosts / batch)
    out["statistics"] = Program(jax.jit(features), args, steps,
                         f"data parallel on each host's {per_host} devices, batch {batch}")

    # barycenter: the stage's program, the host's classes split over its devices (its own classes each).
    feature_dim = jax.eval_shape(features, teacher_vars,
                                 jax.ShapeDtypeStruct((1, *shapes.image_shape), jnp.float32))[0].shape[-1]
    per_class = int(config.barycenter.max_features_per_class) or math.ceil(shapes.num_train / C)
    host_classes = -(-math.ceil(C / target.hosts) // host.size) * host.size
    bary_mesh = Mesh(np.asarray(target.host_devices()), ("classes",))
    solve = class_barycenters_on(bary_mesh, m, config.barycenter)
    split = NamedSharding(bary_mesh, PartitionSpec("classes"))
    bary_args = (jax.ShapeDtypeStruct((host_classes, per_class, feature_dim), jnp.float32, sharding=split),
                 jax.ShapeDtypeStruct((host_classes, per_class), jnp.float32, sharding=split),
                 jax.eval_shape(lambda: jax.random.split(jax.random.key(0), host_classes)))
    bary_args = (*bary_args[:2], jax.ShapeDtypeStruct(bary_args[2].shape, bary_args[2].dtype, sharding=split))
    out["barycenter"] = Program(solve, bary_args, 1,
                         f"{host_classes // host.size} classes per device ({per_class} x {feature_dim} features "
                         f"each); XLA counts each loop body once: a lower bound")

    # recover: the synthesis step over the whole mesh, classes sharded, in chunks.
    cfg = config.synthesis
    group, spread = class_layout(cfg, m, C, mesh.size)
    C_pad = sharding.num_padded_classes(C, mesh, group)
    chunk = None if spread else chunk_classes(cfg, m, C_pad // mesh.size, group, platform)
    tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, max(int(cfg.iterations), 1)), b1=0.5, b2=0.9)
    cls = sharding.class_sharding(mesh)
    rep = sharding.replicated(mesh)
    images = jax.ShapeDtypeStruct((C_pad, m, *shapes.image_shape), jnp.float32)
    state = jax.eval_shape(lambda x: SynthesisState(step=jnp.zeros((), jnp.int32), images=x,
                                                    opt_state=tx.init(x)), images)
    state_sh = sharding.tree_shardings(state, mesh, C_pad)
    _, moments = jax.eval_shape(features, teacher_vars, jax.ShapeDtypeStruct((1, *shapes.image_shape), jnp.float32))
    if cfg.per_class_bn:
        bn = {k: jax.ShapeDtypeStruct((C_pad, v[0].shape[-1]), jnp.float32, sharding=cls) for k, v in moments.items()}
    else:
        bn = {k: jax.ShapeDtypeStruct((v[0].shape[-1],), jnp.float32, sharding=rep) for k, v in moments.items()}
    targets = Targets(jax.ShapeDtypeStruct((C_pad, m, feature_dim), jnp.float32, sharding=cls), bn, bn)
    step = make_synthesis_step(teacher_model, cfg, shapes.mean, shapes.std, shapes.image_shape[0], tx, config.seed,
                               state_shardings=state_sh, mesh=mesh, chunk=chunk, spread=spread)
    args = (_abstract(state, state_sh), targets, _abstract(teacher_vars, rep),
            jax.ShapeDtypeStruct((C_pad,), jnp.int32, sharding=cls),
            jax.ShapeDtypeStruct((C_pad,), jnp.float32, sharding=cls))
    chunk_note = "groups spread over devices" if spread else f"chunks of {chunk} classes ({chunk * m} images)"
    out["recover"] = Program(step, args, int(cfg.iterations),
                      f"{C_pad // mesh.size} classes per device ({C_pad - C} padded), {chunk_note}")

    # relabel and evaluate: the students' training steps (every model and label mode; the largest counts).
    seeds = len(tuple(config.eval.seeds))
    programs = []
    for model_name in config.eval.models:
        for mode in config.eval.label_modes:
            spec = config.eval[mode].copy_and_resolve_references()
            with spec.unlocked():
                spec.model = model_name
            student = model_from_spec(spec, C, config.conv_impl, platform)
            teacher = (teacher_model, teacher_vars) if mode == "soft" else None
            programs.append((f"{model_name} {mode}", _training(
                student, spec, C * m, shapes.image_shape, shapes.mean, shapes.std, mesh, target.hosts,
                seeds if seeds > 1 else None, teacher=teacher, config=config)))
    out["evaluate"] = programs
    if "soft" in config.eval.label_modes:
        spec = config.eval.soft
        batch, steps = batch_plan(C * m, spec)
        relabel_batch = jax.ShapeDtypeStruct((batch, *shapes.image_shape), jnp.float32,
                                             sharding=NamedSharding(mesh, PartitionSpec()))
        fn = jax.jit(lambda v, x: teacher_model.apply(v, x, train=False).astype(jnp.float16))
        out["relabel"] = Program(fn, (_abstract(teacher_vars, NamedSharding(mesh, PartitionSpec())), relabel_batch),
                                 steps, f"teacher logits, batch {batch}, one device")
    return out


def _lowered_cost(lowered) -> dict:
    """XLA's cost analysis of a lowered (not yet partitioned) program: the lowering's own where its backend
    gives one, else that of this host's CPU backend over the same HLO module (a compile-only GPU gives none)."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        return cost
    try:
        from jax._src import xla_bridge
        from jax._src.lib import xla_client

        module = lowered.compiler_ir("hlo").as_hlo_module()
        return xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module) or {}
    except Exception:  # noqa: BLE001 - a private API: without it the row has no FLOPs, not a crash
        return {}


class Program(NamedTuple):
    """One program a stage runs: the jitted function, its abstract arguments (shapes and shardings on the
    target), how many times the stage runs it, and how it is laid out."""

    fn: Any
    args: tuple
    steps: int
    layout: str


def _analyse(program: Program, target: Target) -> dict:
    """Compile one program and read its per-device memory, FLOPs, bytes and roofline time."""
    steps, note = program.steps, program.layout
    t0 = time.time()
    try:
        lowered = program.fn.lower(*program.args)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - a program that does not compile is a row, not a crash
        return {"compiled": False, "error": str(e).strip().splitlines()[0][:300], "steps": steps, "layout": note,
                "compile_seconds": round(time.time() - t0, 1)}
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = bytes_ = None
    if cost:
        flops, bytes_ = cost.get("flops"), cost.get("bytes accessed")
    if flops is None:  # GPU: no cost analysis of the compiled program; the lowered one's, per device
        whole = _lowered_cost(lowered)
        # A shard_map body is per device already; the rest of a lowered program is the whole mesh's work.
        manual = "manual_computation" in lowered.as_text()
        devices = 1 if manual else max(len(s.device_set) for s in jax.tree.leaves(compiled.input_shardings))
        flops = whole.get("flops", 0.0) / devices
        bytes_ = whole.get("bytes accessed", 0.0) / devices
    step_seconds = max(float(flops or 0) / target.peak_flops, float(bytes_ or 0) / target.bandwidth)
    return {"compiled": True, "per_device_bytes": peak, "flops_per_step": flops, "bytes_per_step": bytes_,
            "steps": steps, "step_seconds": step_seconds, "estimated_seconds": step_seconds * steps,
            "layout": note, "compile_seconds": round(seconds, 1)}


_FIXES = {
    "recover": "lower --config.synthesis.chunk_images (images per forward/backward chunk) or use more devices",
    "pretrain": "lower --config.teacher.batch_size or use more devices (the batch is split over them)",
    "statistics": "use hosts with more devices (each host splits its batch of 500 over its own)",
    "evaluate": "lower --config.eval.soft.batch_size / eval.hard.batch_size, or evaluate fewer seeds at once",
    "relabel": "lower --config.eval.soft.batch_size",
    "barycenter": "set --config.barycenter.max_features_per_class",
}


def _advice(record: dict) -> str:
    where = f"{record['stage']} ({record['program']})" if record["program"] != record["stage"] else record["stage"]
    if not record.get("compiled"):
        return f"{where}: does not compile for {record['target']}: {record.get('error')}"
    return (f"{where}: needs {record['per_device_bytes'] / GIB:.1f} GiB per device of "
            f"{record['device_memory_bytes'] / GIB:.1f} GiB: {_FIXES[record['stage']]}")


def plan(config, workdir: str, target_text: str) -> list[dict]:
    """Stage ``plan``: compiles each stage for ``target_text`` and writes ``workdir/plan.json``.

    Returns the records; the CLI exits 3 when one does not fit.
    """
    target = parse_target(target_text)
    shapes = Shapes(config)
    programs = stage_programs(config, target, shapes)
    rate = _decode_rate(shapes.image_shape[0]) if shapes.image_shape[0] >= 64 else None
    _print_header(target)
    records = []
    for stage in ("pretrain", "statistics", "barycenter", "recover", "relabel", "evaluate"):
        if stage not in programs:
            continue
        entries = programs[stage] if isinstance(programs[stage], list) else [("", programs[stage])]
        for label, program in entries:
            record = {"stage": stage, "program": label or stage, "target": target.name,
                      **_analyse(program, target)}
            record["device_memory_bytes"] = target.device_memory
            record["fits"] = bool(record.get("compiled")) and record["per_device_bytes"] <= target.device_memory
            # pretrain and statistics read real images: what a host must decode per second at the estimate.
            if stage in ("pretrain", "statistics") and record.get("estimated_seconds"):
                images = shapes.num_train * (int(config.teacher.epochs) if stage == "pretrain" else 1)
                record["images_per_second_per_host_needed"] = images / target.hosts / record["estimated_seconds"]
                record["images_per_second_decoded_here"] = rate
            record["peak_figures"] = target.peak_source
            _print_row(record)
            records.append(record)
    total = sum(r.get("estimated_seconds", 0.0) for r in records)
    print(f"total estimate: {_duration(total)} (every stage once; evaluate counts each model and label mode)")
    files.write_json(os.path.join(workdir, PLAN_FILE), records)
    return records


def _print_header(target: Target) -> None:
    print(f"plan for {target.name}: {len(target.devices)} devices on {target.hosts} hosts; roofline peak figures: "
          f"{target.peak_source}. Estimates of compiled programs, not measured times.")
    print(f"{'stage':<11} {'program':<22} {'fits':<4} {'GiB/device':>14} {'TFLOP/step':>10} {'GB/step':>9} "
          f"{'steps':>8} {'estimate':>10} {'compile':>8}  layout", flush=True)


def _print_row(r: dict) -> None:
    if not r.get("compiled"):
        print(f"{r['stage']:<11} {r['program'][:22]:<22} no   {'did not compile: ' + r['error']}", flush=True)
        return
    mem = f"{r['per_device_bytes'] / GIB:.2f}/{r['device_memory_bytes'] / GIB:.0f}"
    print(f"{r['stage']:<11} {r['program'][:22]:<22} {'yes' if r['fits'] else 'NO':<4} {mem:>14} "
          f"{(r['flops_per_step'] or 0) / 1e12:>10.4f} {(r['bytes_per_step'] or 0) / 1e9:>9.3f} "
          f"{r['steps']:>8} {_duration(r['estimated_seconds']):>10} {r['compile_seconds']:>7.1f}s  {r['layout']}")
    if "images_per_second_per_host_needed" in r:
        here = r["images_per_second_decoded_here"]
        print(f"{'':<11} input: {r['images_per_second_per_host_needed']:.0f} images/s per host needed at the "
              f"estimate; {'n/a' if here is None else f'{here:.0f}'} decoded per second by one process here")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def not_fitting(records: list[dict]) -> list[str]:
    """One line per record that does not fit, saying what to change."""
    return [_advice(r) for r in records if not r["fits"]]
