"""Stage ``statistics``: one eval-mode pass of the teacher over the real training images.

Per class, the penultimate features and, for every BatchNorm layer, the exact mean and (biased)
variance of the layer's input, written one file per class (``statistics/class_00007.npz``). A
process computes and writes only the classes its devices own (`wmdd_jax.sharding`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from wmdd_jax import checkpoint as ckpt
from wmdd_jax import sharding
from wmdd_jax.data import Source, load_split, normalize
from wmdd_jax.errors import UserError
from wmdd_jax.fingerprint import fingerprint
from wmdd_jax.models import BN_STATS, collect_bn_moments
from wmdd_jax.teacher import identity as teacher_identity
from wmdd_jax.teacher import load_teacher
from wmdd_jax.train_step import Teacher

STATS_DIR = "statistics"


class ClassStatistics(NamedTuple):
    """Per-class teacher statistics of the real data, for the classes in ``classes``.

    classes: the class ids held (all, or those one process owns); everything below is aligned with it.
    features: per class, ``[n_k, d]`` penultimate features (eval mode, no augmentation).
    indices: per class, ``[n_k]`` indices of those images in the training source.
    bn_mean, bn_var: layer path -> ``[len(classes), channels]`` class-conditional mean / biased
      variance of the layer's input over all images of the class and all positions.
    """

    classes: list[int]
    features: list[np.ndarray]
    indices: list[np.ndarray]
    bn_mean: dict[str, np.ndarray]
    bn_var: dict[str, np.ndarray]


@functools.lru_cache(maxsize=4)
def _feature_fn(model):
    @jax.jit
    def run(variables, x):
        (_, features), state = model.apply(variables, x, train=False, return_features=True, mutable=[BN_STATS])
        return features, collect_bn_moments(state)
    return run


def class_statistics(teacher: Teacher, source: Source, *, classes=None, batch_size: int = 500,
                     max_features_per_class: int = 0, seed: int = 0, devices=None,
                     verbose: bool = True) -> ClassStatistics:
    """One pass over the images of ``classes`` (default all); BN statistics pooled exactly in float64.

    Only those classes' images are read. With ``max_features_per_class``, class ``k`` keeps a
    random subset drawn from ``(seed, k)``, the same whichever process computes it.

    Data parallel over ``devices`` (default: `wmdd_jax.sharding.local_work_devices`): each batch,
    rounded up to a multiple of their count, is split along a 1-D ``batch`` mesh and the teacher
    replicated on it. One batch stays in flight: batch ``i + 1`` is dispatched before batch ``i``
    comes back to the host, so reading the images overlaps the devices' work. Per-sample results
    are pooled on the host in float64, so they do not depend on the device count beyond round-off
    inside the per-sample computation.
    """
    classes = list(range(source.num_classes)) if classes is None else [int(k) for k in classes]
    per_class = [np.asarray(source.class_indices(k)) for k in classes]
    order = np.concatenate(per_class)
    position = np.repeat(np.arange(len(classes)), [len(i) for i in per_class])
    mesh = Mesh(np.asarray(sharding.local_work_devices() if devices is None else devices), ("batch",))
    batch_size = -(-batch_size // mesh.size) * mesh.size  # padded rows (the last index again) are dropped
    rows = NamedSharding(mesh, PartitionSpec("batch"))
    variables = jax.device_put(teacher.variables, NamedSharding(mesh, PartitionSpec()))
    run = _feature_fn(teacher.model)
    feats, counts = [], np.bincount(position, minlength=len(classes)).astype(np.float64)
    sums: dict[str, list[np.ndarray]] = {}

    def pool(start, outputs):  # batch ``start``'s outputs, waited for and added up on the host
        f, moments = jax.device_get(outputs)
        n, pos = min(batch_size, len(order) - start), position[start : start + batch_size]
        feats.append(f[:n])
        for layer, (m, v) in moments.items():
            m, v = np.asarray(m[:n], np.float64), np.asarray(v[:n], np.float64)
            s = sums.setdefault(layer, [np.zeros((len(classes), m.shape[1])), np.zeros((len(classes), m.shape[1]))])
            np.add.at(s[0], pos, m)
            np.add.at(s[1], pos, v + m * m)  # per-sample E[x^2]

    in_flight = None
    for start in tqdm(range(0, len(order), batch_size), desc="statistics", leave=False,
                      disable=not verbose or jax.process_index() != 0):
        idx = order[start : start + batch_size]
        images, _ = source.get(np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])]))
        outputs = run(variables, jax.device_put(normalize(images, source.mean, source.std), rows))
        if in_flight is not None:
            pool(*in_flight)
        in_flight = (start, outputs)
    if in_flight is not None:
        pool(*in_flight)
    features = np.split(np.concatenate(feats), np.cumsum([len(i) for i in per_class])[:-1])
    denom = np.maximum(counts, 1)[:, None]
    bn_mean = {k: (s[0] / denom).astype(np.float32) for k, s in sums.items()}
    bn_var = {k: np.maximum(s[1] / denom - (s[0] / denom) ** 2, 0).astype(np.float32) for k, s in sums.items()}
    for i, k in enumerate(classes):
        if max_features_per_class and len(per_class[i]) > max_features_per_class:
            keep = np.sort(np.random.default_rng([seed, k]).choice(len(per_class[i]), max_features_per_class,
                                                                   replace=False))
            features[i], per_class[i] = features[i][keep], per_class[i][keep]
    return ClassStatistics(classes, features, per_class, bn_mean, bn_var)


def class_file(folder: str, k: int) -> str:
    return os.path.join(folder, f"class_{k:05d}.npz")


def save_statistics(stats: ClassStatistics, folder: str) -> None:
    """One file per class held (a process writes only the classes it owns)."""
    os.makedirs(folder, exist_ok=True)
    for i, k in enumerate(stats.classes):
        arrays = {"features": stats.features[i], "indices": stats.indices[i]}
        arrays.update({f"mean/{layer}": v[i] for layer, v in stats.bn_mean.items()})
        arrays.update({f"var/{layer}": v[i] for layer, v in stats.bn_var.items()})
        ckpt.write_npz(class_file(folder, k), **arrays)


def load_statistics(folder: str, classes) -> ClassStatistics:
    """The statistics of ``classes`` (a list of ids, or a class count for all)."""
    classes = list(range(classes)) if isinstance(classes, int) else list(classes)
    missing = [class_file(folder, k) for k in classes if not os.path.exists(class_file(folder, k))]
    if missing:
        raise UserError(f"{len(missing)} class statistics files missing in {folder} (first: {missing[0]}): run the "
                        f"'statistics' stage with this --workdir")
    features, indices, means, variances = [], [], {}, {}
    for k in classes:
        z = ckpt.read_npz(class_file(folder, k), "statistics")
        features.append(z["features"])
        indices.append(z["indices"])
        for key in z:
            kind, _, layer = key.partition("/")
            if kind == "mean":
                means.setdefault(layer, []).append(z[key])
            elif kind == "var":
                variances.setdefault(layer, []).append(z[key])
    return ClassStatistics(classes, features, indices, {k: np.stack(v) for k, v in means.items()},
                           {k: np.stack(v) for k, v in variances.items()})


def owned_classes(mesh, num_classes: int, group: int = 1) -> list[int]:
    """The classes this process works on: its devices' share of the class axis (whole ``group``s each)."""
    classes = sharding.owned_classes(num_classes, mesh, group)
    if not classes:
        raise UserError(f"process {jax.process_index()} owns none of the {num_classes} classes on a mesh of "
                        f"{mesh.size} devices; use fewer devices (--config.mesh.shape)")
    return classes


def data_recipe(data_config, source: Source) -> dict:
    """What fixes the training images a stage reads: the data settings and the split's size."""
    keys = ("name", "tfds_name", "image_size", "validation_per_class", "validation_seed")
    # The labels' fingerprint (cheap, unlike the images'): another copy of the data with other labels
    # or another order is not taken for the one the statistics were computed on.
    return {"data": {k: data_config.get(k) for k in keys}, "num_train_images": len(source),
            "train_labels": fingerprint({"labels": np.asarray(source.labels)})}


def statistics(config, workdir: str) -> ClassStatistics:
    """Stage ``statistics`` for this process's classes; skipped when their files exist."""
    folder = os.path.join(workdir, STATS_DIR)
    source = load_split(config.data, "train")
    classes = owned_classes(sharding.make_mesh(config.mesh), source.num_classes)
    teacher = load_teacher(config, workdir, source)
    ckpt.check_recipe(folder, dict(data_recipe(config.data, source), teacher=teacher_identity(teacher),
                                   max_features_per_class=int(config.barycenter.max_features_per_class),
                                   seed=int(config.seed)), "class statistics")
    if all(os.path.exists(class_file(folder, k)) for k in classes):
        return load_statistics(folder, classes)
    t0 = time.time()
    stats = class_statistics(teacher, source, classes=classes, seed=config.seed,
                             max_features_per_class=config.barycenter.max_features_per_class)
    save_statistics(stats, folder)
    print(f"statistics: {sum(len(source.class_indices(k)) for k in classes)} images of {len(classes)} classes, "
          f"{len(stats.bn_mean)} BN layers, {stats.features[0].shape[1]}-d features, "
          f"{sum(len(f) for f in stats.features)} kept ({time.time() - t0:.0f} s)")
    return stats
