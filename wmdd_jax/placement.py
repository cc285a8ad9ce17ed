"""Where the arrays of a training run live: stacked runs, and batches laid over a mesh.

`wmdd_jax.train.train_group` trains several runs of one model together (their states stacked on a
leading run axis) and, given a mesh, spreads the work over its devices. `BatchLayout` decides how:

* ``runs``: the run axis split over the devices (each device trains whole runs), when the number
  of runs is a multiple of the device count;
* ``batch``: data parallel, the batch axis split and the parameters replicated, when the batch
  size is a multiple of the device count (BatchNorm statistics are then over the global batch:
  the step is one program over the mesh, and XLA adds the cross-device sums);
* ``grid``: runs over one mesh axis and the batch over the other, when neither divides the device
  count alone (3 runs of batch 100 on 16 devices: 4 x 4, the runs padded to 4 with a copy of the
  last, whose results are dropped);
* ``replicated``: every device computes the whole step (nothing divides).

On one process a single run may use fewer devices than the mesh has: the most that divide its
batch. Several runs always fill the mesh (``runs``, ``batch`` or ``grid``).

On several processes each process loads only the rows its own devices hold.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wmdd_jax.sharding import put


def stack(trees: list) -> Any:
    """One tree whose leaves are the leaves of ``trees`` stacked on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class BatchLayout:
    """How one group of runs (``num_runs``, ``None`` for a single unstacked run) sits on ``mesh``."""

    def __init__(self, mesh: Mesh | None, num_runs: int | None, batch_size: int, num_processes: int | None = None):
        """``num_processes``: of the run (default ``jax.process_count()``; `wmdd_jax.plan` lays out a pod's)."""
        self.num_runs, self.batch_size = num_runs, batch_size
        self.padded_runs = num_runs  # the runs stepped: ``num_runs``, or more in a ``grid``
        self.mode, self.mesh = "single", mesh
        if mesh is None or mesh.size == 1:
            return
        devices = list(mesh.devices.flat)
        processes = jax.process_count() if num_processes is None else num_processes
        if processes > 1:  # every process's devices take part: the whole mesh or nothing
            sizes = [len(devices)]
        else:  # on one process, as many devices as divide the work (1 run of batch 100 on 8: 4)
            sizes = [d for d in range(len(devices), 0, -1) if len(devices) % d == 0]
        for d in sizes:
            for mode, count in (("runs", num_runs), ("batch", batch_size)):
                if count is not None and count % d == 0 and d > 1:
                    self.mode, self.mesh = mode, Mesh(np.asarray(devices[:d]), ("devices",))
                    return
            b = math.gcd(batch_size, d)  # the batch over b devices, the runs over the other d / b
            if num_runs is not None and num_runs > 1 and d > 1 and d // b > 1:
                r = d // b
                self.padded_runs = -(-num_runs // r) * r
                self.mode, self.mesh = "grid", Mesh(np.asarray(devices[:d]).reshape(r, b), ("runs", "batch"))
                return
        self.mode = "replicated"

    def pad(self, items: list) -> list:
        """``items`` (one per run) with copies of the last for the padding runs of a ``grid``."""
        return list(items) + [items[-1]] * ((self.padded_runs or len(items)) - len(items))

    def _sharding(self, spec: PartitionSpec) -> NamedSharding | None:
        return None if self.mode == "single" else NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding | None:
        return self._sharding(PartitionSpec())

    @property
    def state_sharding(self) -> NamedSharding | None:
        """The runs' parameters and optimizer states: split by run, or whole on every device."""
        if self.mode == "grid":
            return self._sharding(PartitionSpec("runs"))
        return self._sharding(PartitionSpec(self.mesh.axis_names) if self.mode == "runs" else PartitionSpec())

    def _batch_spec(self) -> PartitionSpec:
        axes = self.mesh.axis_names
        if self.mode == "grid":
            return PartitionSpec("runs", "batch")
        if self.mode == "runs":
            return PartitionSpec(axes)
        if self.mode == "batch":
            return PartitionSpec(None, axes) if self.num_runs is not None else PartitionSpec(axes)
        return PartitionSpec()

    def _commit(self, tree: Any) -> Any:
        """``tree`` committed to the one device a single layout trains on. Arrays fresh from an
        initialisation are uncommitted, the step's outputs committed: without this the step compiles
        twice, once for the first call and once for the rest (4 s more for a ConvNet-3 on a CPU)."""
        device = self.mesh.devices.flat[0] if self.mesh is not None else jax.local_devices()[0]
        return jax.device_put(tree, device)

    def put_state(self, tree: Any) -> Any:
        return self._commit(tree) if self.mode == "single" else put(tree, self.state_sharding)

    def put_replicated(self, tree: Any) -> Any:
        return self._commit(tree) if self.mode == "single" else put(tree, self.replicated)

    def put_runs(self, x: np.ndarray) -> Any:
        """A per-run host array (e.g. the data seeds), laid like the runs' states."""
        return self._commit(x) if self.mode == "single" else put(x, self.state_sharding)

    def load(self, runs: list, weights: list[np.ndarray],
             indices: Callable[[Any], np.ndarray]) -> tuple[Any, Any, Any]:
        """(images, labels, loss weights) of this step, ``[runs, batch, ...]`` when stacked.

        ``indices(run)``: the rows of ``run.source`` in this step's batch. Only the rows held by
        this process's devices are read from the sources.
        """
        stacked = self.num_runs is not None
        members, rows = range(len(runs)), slice(None)
        sharding = None
        if self.mode != "single":
            sharding = self._sharding(self._batch_spec())
            shape = (len(runs), self.batch_size) if stacked else (self.batch_size,)
            local = _local_block(sharding, shape)
            if stacked:
                members, rows = range(*local[0].indices(len(runs))), local[1]
            else:
                rows = local[0]
        parts = []
        for i in members:
            idx = indices(runs[i])[rows]
            images, labels = runs[i].source.get(idx)
            parts.append((np.asarray(images), np.asarray(labels), weights[i][idx]))
        host = [np.stack(column) if stacked else column[0] for column in zip(*parts)]
        if sharding is None:
            return tuple(host)
        full = [((len(runs), self.batch_size) if stacked else (self.batch_size,)) + x.shape[(2 if stacked else 1):]
                for x in host]
        return tuple(jax.make_array_from_process_local_data(sharding, x, shape) for x, shape in zip(host, full))

    def gather(self, tree: Any) -> Any:
        """``tree`` whole on every device, so that each process can read every run's values."""
        if self.mode in ("single", "replicated"):
            return tree
        return jax.jit(lambda t: t, out_shardings=self.replicated)(tree)


def _local_block(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The smallest block of ``shape`` (per axis, a slice) that holds every shard of this process."""
    index_map = sharding.addressable_devices_indices_map(shape)
    block = []
    for axis, size in enumerate(shape):
        ranges = [index[axis].indices(size) if axis < len(index) else (0, size, 1) for index in index_map.values()]
        block.append(slice(min(r[0] for r in ranges), max(r[1] for r in ranges)))
    return tuple(block)
