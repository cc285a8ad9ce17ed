"""The device mesh, the class-axis shardings, and multi-host start-up (JAX's own runtime only).

Distillation is independent across classes except for a few sums, so every per-class array
(features, BN statistics, barycenter points, synthetic images and their optimizer state) is
sharded along its leading class axis over all devices of the mesh; the teacher is replicated.

Rules:
  * The mesh is ``config.mesh.shape`` over ``config.mesh.axes`` (default: one axis ``classes``
    holding every device); class arrays are split over all of its axes together.
  * A class count that is not a multiple of the device count (times the classes of one official
    synthesis batch, ``group``) is padded at the end with empty classes (``num_padded_classes``);
    they carry a zero mask and add nothing to any loss.
  * Device ``i`` of the flattened mesh owns the consecutive classes
    ``[i * C_pad / n, (i + 1) * C_pad / n)``; a process owns the classes of its devices and reads
    only their real data (``owned_classes``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from wmdd_jax.errors import UserError


def initialize_distributed(config) -> bool:
    """``jax.distributed.initialize`` when ``config.distributed.enabled`` or ``WMDD_DISTRIBUTED=1`` asks.

    Empty fields are left to JAX's cluster detection (Cloud TPU, Slurm, Open MPI). On CPU the
    cross-process collectives use gloo. Must run before any JAX computation; returns whether
    this is a multi-process run.
    """
    cfg = config.distributed
    if not (cfg.enabled or os.environ.get("WMDD_DISTRIBUTED", "") not in ("", "0")):
        return False
    if not jax.distributed.is_initialized():
        if cfg.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        kwargs = dict(coordinator_address=cfg.coordinator_address or None,
                      num_processes=cfg.num_processes if cfg.num_processes > 0 else None,
                      process_id=cfg.process_id if cfg.process_id >= 0 else None,
                      initialization_timeout=int(cfg.timeout_secs))
        try:
            jax.distributed.initialize(**kwargs)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"jax.distributed.initialize failed ({str(e).splitlines()[0][:200]}); set "
                            f"--config.distributed.coordinator_address=HOST:PORT, num_processes and process_id, "
                            f"or run where JAX detects the cluster (TPU VM, Slurm, Open MPI)") from e
    return jax.process_count() > 1


def process_index() -> int:
    """``jax.process_index()`` without starting a backend when no distributed run was set up."""
    return jax.process_index() if jax.distributed.is_initialized() else 0


def process_count() -> int:
    return jax.process_count() if jax.distributed.is_initialized() else 1


def make_mesh(mesh_config, devices: list | None = None) -> Mesh:
    """A ``Mesh`` of ``mesh_config.shape`` (one ``-1`` entry: the devices left) over ``mesh_config.axes``."""
    devices = list(jax.devices() if devices is None else devices)
    shape, axes = [int(s) for s in mesh_config.shape], tuple(mesh_config.axes)
    if len(shape) != len(axes):
        raise UserError(f"mesh.shape {tuple(shape)} and mesh.axes {axes} differ in length")
    if shape.count(-1) > 1:
        raise UserError(f"mesh.shape {tuple(shape)} may hold at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        shape[shape.index(-1)] = len(devices) // known if known and len(devices) % known == 0 else 0
    if math.prod(shape) <= 0 or math.prod(shape) > len(devices) or (-1 in mesh_config.shape
                                                                    and math.prod(shape) != len(devices)):
        raise UserError(f"mesh.shape {tuple(mesh_config.shape)} does not fit {len(devices)} devices; use -1 for "
                        f"'all the rest' or a product that divides the device count")
    devices = devices[: math.prod(shape)]
    # Auto axes: model code stays sharding-agnostic and XLA places the few cross-class sums.
    axis_types = (AxisType.Auto,) * len(axes)
    try:  # jax orders the devices along the chips' interconnect
        return jax.make_mesh(tuple(shape), axes, axis_types=axis_types, devices=devices)
    except AssertionError:
        # jax builds TPU v4+ meshes of one device per chip only ("megacore"); with two devices per chip
        # (v4 in its default mode) the devices go in order of host, chip coordinates and core instead,
        # so that the two cores of a chip are neighbours on the last axis.
        def place(d):
            return (d.process_index, tuple(getattr(d, "coords", ())[::-1]), getattr(d, "core_on_chip", 0))

        ordered = np.asarray(sorted(devices, key=place), dtype=object).reshape(shape)
        return Mesh(ordered, axes, axis_types=axis_types)


def mesh_platform(mesh: Mesh) -> str:
    """The platform (``cpu``, ``gpu``, ``tpu``) of the devices ``mesh`` holds: what its programs are
    compiled for, and so which kernels the models take (`wmdd_jax.models.create_model`)."""
    return mesh.devices.flat[0].platform


def run_platform() -> str:
    """The platform of the devices a run's meshes are made of (`make_mesh` takes ``jax.devices()``)."""
    return jax.devices()[0].platform


def local_work_devices() -> list:
    """The devices a process splits its own share of a stage over (statistics, barycenters): all of its
    accelerators, or its first CPU device (a process's CPU devices share its cores: a split gains nothing,
    and other per-device batches change the round-off that the synthesis amplifies)."""
    devices = jax.local_devices()
    return devices[:1] if devices[0].platform == "cpu" else devices


def class_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (class) axis split over every mesh axis; the rest whole."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_padded_classes(num_classes: int, mesh: Mesh, group: int = 1) -> int:
    """``num_classes`` rounded up to a multiple of the device count times ``group``: each device then
    holds whole groups of ``group`` consecutive classes (the synthesis loss's official batches)."""
    unit = mesh.size * max(1, int(group))
    return -(-num_classes // unit) * unit


def owned_classes(num_classes: int, mesh: Mesh, group: int = 1) -> list[int]:
    """The real classes whose shard lives on this process's devices, in order."""
    sharding = class_sharding(mesh)
    shape = (num_padded_classes(num_classes, mesh, group),)
    owned = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        owned.update(range(*index[0].indices(shape[0])))
    return sorted(k for k in owned if k < num_classes)


def class_array(mesh: Mesh, num_classes: int, per_class: Callable[[int], np.ndarray], row_shape: tuple,
                dtype=np.float32, group: int = 1) -> jax.Array:
    """A class-sharded global array ``[C_pad, *row_shape]`` from ``per_class(k)`` for this process's classes.

    Only the classes of local devices are asked for (each once); padded classes are zeros. ``group``:
    as in `num_padded_classes`.
    """
    C_pad = num_padded_classes(num_classes, mesh, group)
    row_shape = tuple(int(s) for s in row_shape)
    cache: dict[int, np.ndarray] = {}

    def rows(k: int) -> np.ndarray:
        if k >= num_classes:
            return np.zeros(row_shape, dtype)
        if k not in cache:
            cache[k] = np.asarray(per_class(k), dtype).reshape(row_shape)
        return cache[k]

    def callback(index):
        ks = range(*index[0].indices(C_pad))
        return np.stack([rows(k) for k in ks])[(slice(None), *index[1:])]

    return jax.make_array_from_callback((C_pad, *row_shape), class_sharding(mesh), callback)


def put(tree: Any, sharding: NamedSharding) -> Any:
    """Every process passes the same host values; each device gets its part under ``sharding``."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                               lambda index: np.asarray(x)[index]), tree)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every process passes the same host values; each device gets a whole copy."""
    return put(tree, replicated(mesh))


def tree_shardings(tree: Any, mesh: Mesh, num_padded: int) -> Any:
    """Class sharding for leaves whose leading axis is the (padded) class axis, replication for the rest."""
    def pick(x):
        return class_sharding(mesh) if np.ndim(x) >= 1 and np.shape(x)[0] == num_padded else replicated(mesh)
    return jax.tree.map(pick, tree)


def local_class_rows(x: jax.Array, num_classes: int) -> dict[int, np.ndarray]:
    """This process's real classes of a class-sharded array, as host arrays keyed by class."""
    out = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            if start + i < num_classes:
                out[start + i] = data[i]
    return out


def sync(name: str) -> None:
    """A barrier across processes (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_processes_agree(flag: bool) -> bool:
    """True when ``flag`` holds on every process."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(multihost_utils.process_allgather(np.array([flag], np.int32))))


def broadcast_flag(flag: bool) -> bool:
    """Process 0's value of ``flag`` on every process (for decisions like 'checkpoint now')."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.array(flag, np.int32)))
