"""Stage ``barycenter``: the targets of the synthesis, per class.

`wmdd_jax.barycenter.class_barycenters` on each class's teacher features (from ``statistics``):
IPC support points and their weights per class (``barycenter/class_00007.npz``), the points the
synthetic images' features are pulled onto.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from wmdd_jax import barycenter as bary
from wmdd_jax import checkpoint as ckpt
from wmdd_jax import sharding
from wmdd_jax.data import load_split
from wmdd_jax.distill.class_stats import (STATS_DIR, ClassStatistics, class_file, data_recipe, load_statistics,
                                          owned_classes)
from wmdd_jax.errors import UserError
from wmdd_jax.teacher import identity as teacher_identity
from wmdd_jax.teacher import load_teacher

BARYCENTER_DIR = "barycenter"


def compute_barycenters(stats: ClassStatistics, ipc: int, bary_config, seed: int,
                        num_classes: int | None = None, devices=None) -> bary.BarycenterOutput:
    """``class_barycenters`` over the classes of ``stats`` (padded with zero weight), jitted once.

    Class ``k`` draws from ``split(key(seed), num_classes)[k]`` (``num_classes``: of the whole
    set, default ``len(stats.classes)``), so a process's subset gives the rows of the full run.
    ``devices`` (default: `wmdd_jax.sharding.local_work_devices`): with several, the
    classes are split over them (`class_barycenters_on`); each class's row is the same either way.
    """
    num_classes = len(stats.classes) if num_classes is None else num_classes
    sizes = [len(f) for f in stats.features]
    if min(sizes) < ipc:
        raise UserError(f"class {stats.classes[int(np.argmin(sizes))]} has {min(sizes)} images, fewer than "
                        f"ipc={ipc}; lower --config.ipc or raise --config.barycenter.max_features_per_class")
    keys = jax.random.split(jax.random.key(seed), num_classes)[np.asarray(stats.classes)]
    devices = sharding.local_work_devices() if devices is None else devices
    if len(devices) > 1:
        mesh = Mesh(np.asarray(devices), ("classes",))
        points, weights = _padded(stats.features, mesh.size)
        keys = keys[np.arange(len(points)) % len(keys)]  # padded classes: any key (their rows are dropped)
        fn = class_barycenters_on(mesh, ipc, bary_config)
        out = fn(points, weights, keys)
        return jax.tree.map(lambda x: x[: len(sizes)], out)
    labels = np.concatenate([np.full(len(f), i, np.int32) for i, f in enumerate(stats.features)])
    features = np.concatenate(stats.features)
    fn = jax.jit(functools.partial(bary.class_barycenters, num_classes=len(sizes), num_support=ipc,
                                   max_class_size=max(sizes), **_options(bary_config)))
    return fn(features, labels, rng=keys)


def _options(bary_config) -> dict:
    return dict(learn_weights=bool(bary_config.learn_weights), num_iterations=int(bary_config.num_iterations),
                batch_size=int(bary_config.batch_size) or None)


def _padded(features: list[np.ndarray], multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class clouds as ``points [C_pad, n_max, d]`` and ``weights [C_pad, n_max]`` (as
    `wmdd_jax.barycenter.pad_classes` lays them out), classes padded to a multiple of ``multiple``
    with copies of the first (their rows are dropped)."""
    n_max, d = max(len(f) for f in features), features[0].shape[1]
    count = -(-len(features) // multiple) * multiple
    points = np.zeros((count, n_max, d), np.float32)
    weights = np.zeros((count, n_max), np.float32)
    for i in range(count):
        f = features[i] if i < len(features) else features[0]
        points[i, : len(f)], weights[i, : len(f)] = f, 1.0 / len(f)
    return points, weights


def class_barycenters_on(mesh: Mesh, ipc: int, bary_config):
    """``fn(points [C, n, d], weights [C, n], keys [C]) -> BarycenterOutput``: the classes split over
    ``mesh``'s devices (C a multiple of its size), each device solving its own in sequential chunks of
    ``barycenter.batch_size`` classes (0: one ``vmap``)."""
    options = _options(bary_config)
    batch_size = options.pop("batch_size")

    def local(points, weights, keys):
        def one(args):
            p, w, key = args
            return bary.free_support_barycenter(p, ipc, point_weights=w, rng=key, **options)

        if batch_size is None:
            return jax.vmap(one)((points, weights, keys))
        return jax.lax.map(one, (points, weights, keys), batch_size=batch_size)

    classes = PartitionSpec(mesh.axis_names)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(classes, classes, classes), out_specs=classes))


BARYCENTER_KEYS = ("support", "weights", "cost", "converged")


def load_barycenters(folder: str, classes: list[int]) -> dict[str, np.ndarray]:
    """``support [n, m, d]``, ``weights [n, m]``, ``cost [n]``, ``converged [n]`` for ``classes``."""
    missing = [class_file(folder, k) for k in classes if not os.path.exists(class_file(folder, k))]
    if missing:
        raise UserError(f"{len(missing)} barycenter files missing in {folder} (first: {missing[0]}): run the "
                        f"'barycenter' stage with this --workdir")
    rows = []
    for k in classes:
        z = ckpt.read_npz(class_file(folder, k), "barycenter")
        rows.append({key: z[key] for key in BARYCENTER_KEYS})
    return {key: np.stack([r[key] for r in rows]) for key in BARYCENTER_KEYS}


def barycenter(config, workdir: str, teacher_id: str | None = None) -> dict[str, np.ndarray]:
    """Stage ``barycenter``: ``barycenter/class_*.npz`` (support [m, d], weights [m], cost, converged).

    ``teacher_id``: the identity of the teacher (`wmdd_jax.teacher.identity`), if the caller holds it.
    """
    folder = os.path.join(workdir, BARYCENTER_DIR)
    source = load_split(config.data, "train")
    if teacher_id is None:
        teacher_id = teacher_identity(load_teacher(config, workdir, source))
    recipe = {k: v for k, v in config.barycenter.to_dict().items() if k != "batch_size"}  # batch_size: speed
    ckpt.check_recipe(folder, dict(recipe, **data_recipe(config.data, source), teacher=teacher_id,
                                   ipc=int(config.ipc), seed=int(config.seed)), "barycenters")
    classes = owned_classes(sharding.make_mesh(config.mesh), source.num_classes)
    if all(os.path.exists(class_file(folder, k)) for k in classes):
        out = load_barycenters(folder, classes)
        if out["support"].shape[1] == config.ipc:
            return out
        raise UserError(f"{folder} holds barycenters with {out['support'].shape[1]} points per class, not "
                        f"ipc={config.ipc}; use a new --workdir for another IPC")
    stats = load_statistics(os.path.join(workdir, STATS_DIR), classes)
    t0 = time.time()
    res = compute_barycenters(stats, config.ipc, config.barycenter, config.seed, source.num_classes)
    os.makedirs(folder, exist_ok=True)
    out = {key: np.asarray(getattr(res, key)) for key in BARYCENTER_KEYS}
    bad = [k for k, support in zip(classes, out["support"]) if not np.all(np.isfinite(support))]
    if bad:
        raise UserError(f"the barycenters of classes {bad} are not finite (their teacher features hold NaN or "
                        f"infinity); check the teacher and the data, then rerun 'statistics' in a new --workdir")
    for i, k in enumerate(classes):
        ckpt.write_npz(class_file(folder, k), **{key: v[i] for key, v in out.items()})
    print(f"barycenter: {len(classes)} classes x {config.ipc} points, mean W2^2 {out['cost'].mean():.4g} "
          f"({time.time() - t0:.0f} s)")
    return out
