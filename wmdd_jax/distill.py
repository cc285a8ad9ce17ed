"""WMDD's distillation stages: class statistics, barycenter targets, synthesis.

``statistics(config, workdir)``  one eval-mode pass of the teacher over the real
    training images: per class, the penultimate features and, for every
    BatchNorm layer, the exact mean and (biased) variance of the layer's input.
    Written per class (``statistics/class_00007.npz``).
``barycenter(config, workdir)``  ``barycenter.class_barycenters`` on those
    features: IPC support points and weights per class (``barycenter/class_00007.npz``).
``recover(config, workdir)``  the synthetic images, optimised with Adam so that
    their teacher features land on the barycenter points, their per-class BN
    statistics on the real ones, and the teacher classifies them as their class
    (``synthetic/images.npz`` and a PNG grid, one row per class).

Every stage works on the classes of this process's devices (``wmdd_jax.sharding``): one
process does all of them; on several hosts each reads and writes only its own.

See ../shared/DESIGN.md "The method" for the losses and their weights.
"""

from __future__ import annotations

import functools
import glob
import os
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from wmdd_jax import barycenter as bary
from wmdd_jax import checkpoint as ckpt
from wmdd_jax import sharding
from wmdd_jax.data import Source, augment, denormalize, load_split, normalize
from wmdd_jax.errors import UserError
from wmdd_jax.fingerprint import fingerprint
from wmdd_jax.models import BN_STATS, collect_bn_moments, pooled_moments
from wmdd_jax.teacher import identity as teacher_identity
from wmdd_jax.teacher import load_teacher
from wmdd_jax.train import BOOKKEEPING, Teacher

STATS_DIR, BARYCENTER_DIR, SYNTHETIC_DIR = "statistics", "barycenter", "synthetic"


# --------------------------------------------------------------------------- statistics


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
                     max_features_per_class: int = 0, seed: int = 0, verbose: bool = True) -> ClassStatistics:
    """One pass over the images of ``classes`` (default all); BN statistics pooled exactly in float64.

    Only those classes' images are read. With ``max_features_per_class``, class ``k`` keeps a
    random subset drawn from ``(seed, k)``, the same whichever process computes it.
    """
    classes = list(range(source.num_classes)) if classes is None else [int(k) for k in classes]
    per_class = [np.asarray(source.class_indices(k)) for k in classes]
    order = np.concatenate(per_class)
    position = np.repeat(np.arange(len(classes)), [len(i) for i in per_class])
    run = _feature_fn(teacher.model)
    feats, counts = [], np.bincount(position, minlength=len(classes)).astype(np.float64)
    sums: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="statistics", leave=False,
                      disable=not verbose or jax.process_index() != 0):
        idx, pos = order[start : start + batch_size], position[start : start + batch_size]
        pad = batch_size - len(idx)
        images, _ = source.get(np.concatenate([idx, np.full(pad, idx[-1])]))
        f, moments = run(teacher.variables, normalize(images, source.mean, source.std))
        feats.append(np.asarray(f[: len(idx)]))
        for layer, (m, v) in moments.items():
            m, v = np.asarray(m[: len(idx)], np.float64), np.asarray(v[: len(idx)], np.float64)
            s = sums.setdefault(layer, [np.zeros((len(classes), m.shape[1])), np.zeros((len(classes), m.shape[1]))])
            np.add.at(s[0], pos, m)
            np.add.at(s[1], pos, v + m * m)  # per-sample E[x^2]
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


def _class_file(folder: str, k: int) -> str:
    return os.path.join(folder, f"class_{k:05d}.npz")


def save_statistics(stats: ClassStatistics, folder: str) -> None:
    """One file per class held (a process writes only the classes it owns)."""
    os.makedirs(folder, exist_ok=True)
    for i, k in enumerate(stats.classes):
        arrays = {"features": stats.features[i], "indices": stats.indices[i]}
        arrays.update({f"mean/{layer}": v[i] for layer, v in stats.bn_mean.items()})
        arrays.update({f"var/{layer}": v[i] for layer, v in stats.bn_var.items()})
        ckpt.write_npz(_class_file(folder, k), **arrays)


def load_statistics(folder: str, classes) -> ClassStatistics:
    """The statistics of ``classes`` (a list of ids, or a class count for all)."""
    classes = list(range(classes)) if isinstance(classes, int) else list(classes)
    missing = [_class_file(folder, k) for k in classes if not os.path.exists(_class_file(folder, k))]
    if missing:
        raise UserError(f"{len(missing)} class statistics files missing in {folder} (first: {missing[0]}): run the "
                        f"'statistics' stage with this --workdir")
    features, indices, means, variances = [], [], {}, {}
    for k in classes:
        z = ckpt.read_npz(_class_file(folder, k), "statistics")
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


def _owned(mesh, num_classes: int) -> list[int]:
    """The classes this process works on: its devices' share of the class axis."""
    classes = sharding.owned_classes(num_classes, mesh)
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
    classes = _owned(sharding.make_mesh(config.mesh), source.num_classes)
    teacher = load_teacher(config, workdir)
    ckpt.check_recipe(folder, dict(data_recipe(config.data, source), teacher=teacher_identity(teacher),
                                   max_features_per_class=int(config.barycenter.max_features_per_class),
                                   seed=int(config.seed)), "class statistics")
    if all(os.path.exists(_class_file(folder, k)) for k in classes):
        return load_statistics(folder, classes)
    t0 = time.time()
    stats = class_statistics(teacher, source, classes=classes, seed=config.seed,
                             max_features_per_class=config.barycenter.max_features_per_class)
    save_statistics(stats, folder)
    print(f"statistics: {sum(len(source.class_indices(k)) for k in classes)} images of {len(classes)} classes, "
          f"{len(stats.bn_mean)} BN layers, {stats.features[0].shape[1]}-d features, "
          f"{sum(len(f) for f in stats.features)} kept ({time.time() - t0:.0f} s)")
    return stats


# --------------------------------------------------------------------------- barycenter


def compute_barycenters(stats: ClassStatistics, ipc: int, bary_config, seed: int,
                        num_classes: int | None = None) -> bary.BarycenterOutput:
    """``class_barycenters`` over the classes of ``stats`` (padded with zero weight), jitted once.

    Class ``k`` draws from ``split(key(seed), num_classes)[k]`` (``num_classes``: of the whole
    set, default ``len(stats.classes)``), so a process's subset gives the rows of the full run.
    """
    num_classes = len(stats.classes) if num_classes is None else num_classes
    labels = np.concatenate([np.full(len(f), i, np.int32) for i, f in enumerate(stats.features)])
    features = np.concatenate(stats.features)
    sizes = [len(f) for f in stats.features]
    if min(sizes) < ipc:
        raise UserError(f"class {stats.classes[int(np.argmin(sizes))]} has {min(sizes)} images, fewer than "
                        f"ipc={ipc}; lower --config.ipc or raise --config.barycenter.max_features_per_class")
    options = dict(learn_weights=bool(bary_config.learn_weights), num_iterations=int(bary_config.num_iterations),
                   batch_size=int(bary_config.batch_size) or None)
    fn = jax.jit(functools.partial(bary.class_barycenters, num_classes=len(sizes), num_support=ipc,
                                   max_class_size=max(sizes), **options))
    keys = jax.random.split(jax.random.key(seed), num_classes)[np.asarray(stats.classes)]
    return fn(features, labels, rng=keys)


BARYCENTER_KEYS = ("support", "weights", "cost", "converged")


def load_barycenters(folder: str, classes: list[int]) -> dict[str, np.ndarray]:
    """``support [n, m, d]``, ``weights [n, m]``, ``cost [n]``, ``converged [n]`` for ``classes``."""
    missing = [_class_file(folder, k) for k in classes if not os.path.exists(_class_file(folder, k))]
    if missing:
        raise UserError(f"{len(missing)} barycenter files missing in {folder} (first: {missing[0]}): run the "
                        f"'barycenter' stage with this --workdir")
    rows = []
    for k in classes:
        z = ckpt.read_npz(_class_file(folder, k), "barycenter")
        rows.append({key: z[key] for key in BARYCENTER_KEYS})
    return {key: np.stack([r[key] for r in rows]) for key in BARYCENTER_KEYS}


def barycenter(config, workdir: str, teacher_id: str | None = None) -> dict[str, np.ndarray]:
    """Stage ``barycenter``: ``barycenter/class_*.npz`` (support [m, d], weights [m], cost, converged).

    ``teacher_id``: the identity of the teacher (`wmdd_jax.teacher.identity`), if the caller holds it.
    """
    folder = os.path.join(workdir, BARYCENTER_DIR)
    if teacher_id is None:
        teacher_id = teacher_identity(load_teacher(config, workdir))
    recipe = {k: v for k, v in config.barycenter.to_dict().items() if k != "batch_size"}  # batch_size: speed
    source = load_split(config.data, "train")
    ckpt.check_recipe(folder, dict(recipe, **data_recipe(config.data, source), teacher=teacher_id,
                                   ipc=int(config.ipc), seed=int(config.seed)), "barycenters")
    classes = _owned(sharding.make_mesh(config.mesh), source.num_classes)
    if all(os.path.exists(_class_file(folder, k)) for k in classes):
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
        ckpt.write_npz(_class_file(folder, k), **{key: v[i] for key, v in out.items()})
    print(f"barycenter: {len(classes)} classes x {config.ipc} points, mean W2^2 {out['cost'].mean():.4g} "
          f"({time.time() - t0:.0f} s)")
    return out


# --------------------------------------------------------------------------- synthesis


@flax.struct.dataclass
class SynthesisState:
    step: jax.Array
    images: jax.Array      # [C, m, h, w, c] normalised pixels
    opt_state: Any


class Targets(NamedTuple):
    """What the synthetic images of each class are pulled towards."""

    support: jax.Array     # [C, m, d] barycenter points, s_kj <-> b_kj
    bn_mean: dict          # layer -> [C, ch] per-class (or [ch] global) mean of the layer input
    bn_var: dict           # layer -> [C, ch] per-class (or [ch] global) variance


def init_images(config, source: Source, stats: ClassStatistics, support: np.ndarray) -> np.ndarray:
    """``[n, m, h, w, c]`` normalised initial images of the classes of ``stats``.

    ``noise``: class ``k`` draws from ``fold_in(key(seed), k)``. ``real``: for each support
    point, the nearest not yet taken real image of its class (only those images are read).
    """
    n, m = support.shape[:2]
    h, w, ch = source.image_shape
    init = config.synthesis.init
    if init == "noise":
        return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(config.seed), k),
                                                      (m, h, w, ch))) for k in stats.classes])
    if init != "real":
        raise UserError(f"synthesis.init must be 'real' or 'noise', got {init!r}")
    picks = []
    for i in range(n):
        f, b = stats.features[i], support[i]
        d = (f * f).sum(1)[:, None] - 2 * f @ b.T + (b * b).sum(1)[None]      # [n_k, m] squared distances
        chosen = []
        for j in range(m):  # greedy: each support point takes its nearest image not yet taken
            order = np.argsort(d[:, j])
            chosen.append(next(c for c in order if c not in chosen))
        picks.append(stats.indices[i][chosen])
    images, _ = source.get(np.concatenate(picks))
    return np.asarray(normalize(images, source.mean, source.std)).reshape(n, m, h, w, ch)


def _augment(rng, x, cfg, image_size: int):
    """Per-image random-resized crop, flip and roll (jitter scaled from 224 px to ``image_size``)."""
    k1, k2 = jax.random.split(rng)
    crop = tuple(cfg.crop_scale) if cfg.crop_scale is not None else None
    x = augment.augment_batch(k1, x, flip=bool(cfg.flip), crop_scale=crop)
    jitter = int(round(cfg.jitter * image_size / 224))
    if jitter:
        shifts = jax.random.randint(k2, (x.shape[0], 2), 0, jitter + 1)
        x = jax.vmap(lambda im, s: jnp.roll(im, (s[0], s[1]), axis=(0, 1)))(x, shifts)
    return x


def _norm(x):
    """Euclidean norm over the last axis with a finite gradient at 0 (padded classes sit there)."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1) + 1e-12)


def synthesis_loss(images, rng, teacher: Teacher, targets: Targets, cfg, image_size: int, class_ids=None,
                   class_mask=None):
    """WMDD's objective on all classes at once; ``images`` [C, m, h, w, c].

    ``class_ids`` ([C], default ``arange(C)``) are the labels of the classes given (a shard of
    the classes passes its own); class ``k``'s augmentations draw from ``fold_in(rng, k)``, so
    they do not depend on which other classes run beside it. ``class_mask`` ([C], default all
    ones) zeroes padded classes out of every term.

    The official code optimises batches of ``cfg.batch_size`` (100) images, i.e. groups of
    g = batch_size / m whole classes. Summing the official loss over such class groups keeps
    every image's gradient what it is there, whatever number of classes runs at once:
      CE: sum of per-image cross-entropies / batch_size;
      feature: sum over groups of the Frobenius norm of the group's feature differences;
      BN: sum over groups of the mean over its classes of ||var_t - var|| + ||mean_t - mean||.
    """
    C, m = images.shape[:2]
    g = max(1, int(cfg.batch_size) // m)           # classes per official batch
    groups = -(-C // g)
    class_ids = jnp.arange(C) if class_ids is None else class_ids
    mask = jnp.ones(C, images.dtype) if class_mask is None else class_mask.astype(images.dtype)
    keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(class_ids)
    x = jax.vmap(lambda key, im: _augment(key, im, cfg, image_size))(keys, images)
    x = x.reshape(C * m, *images.shape[2:])
    (logits, features), state = teacher.model.apply(teacher.variables, x, train=False, return_features=True,
                                                    mutable=[BN_STATS])
    image_mask = jnp.repeat(mask, m)
    labels = jnp.repeat(class_ids, m)
    ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * image_mask) / (g * m)

    class_group = jnp.arange(C) // g
    group_has_class = jax.ops.segment_sum(mask, class_group, groups) > 0  # False: a group of padding only
    sq = jnp.sum(jnp.square(features - targets.support.reshape(C * m, -1)), axis=-1).reshape(C, m).sum(1)
    feature = jnp.sum(jnp.sqrt(jax.ops.segment_sum(sq * mask, class_group, groups) + 1e-12) * group_has_class)

    bn = 0.0
    local = jnp.repeat(jnp.arange(C), m)  # position of each image's class among those given
    for i, (layer, (mu_i, var_i)) in enumerate(collect_bn_moments(state).items()):
        weight = cfg.first_bn_multiplier if i == 0 else 1.0
        if cfg.per_class_bn:
            mu, var = pooled_moments(mu_i, var_i, local, C)                  # [C, ch]
            per = _norm(targets.bn_var[layer] - var) + _norm(targets.bn_mean[layer] - mu)  # [C]
            bn += weight * jnp.sum(per * mask) / g
        else:  # SRe2L: each batch's statistics against the teacher's running statistics
            mu, var = pooled_moments(mu_i, var_i, jnp.repeat(class_group, m), groups, weights=image_mask)
            per = _norm(targets.bn_var[layer] - var) + _norm(targets.bn_mean[layer] - mu)
            bn += weight * jnp.sum(per * group_has_class)
    feature_term = feature if cfg.use_barycenter else 0.0
    total = cfg.r_wb * ce + feature_term + cfg.r_bn * bn
    return total, {"ce": ce, "feature": feature, "bn": bn}


def make_synthesis_step(model, cfg, mean, std, image_size: int, tx, seed: int, state_shardings=None):
    """``step(state, targets, variables, class_ids, class_mask) -> (state, loss parts)``, one jit.

    With ``state_shardings`` the new state keeps the class sharding of the old (the mesh's
    devices each update their own classes; XLA adds the few cross-class sums).
    """
    lo, hi = normalize(jnp.zeros(()), mean, std), normalize(jnp.ones(()), mean, std)

    def step(state: SynthesisState, targets: Targets, variables, class_ids, class_mask):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        (_, parts), grads = jax.value_and_grad(synthesis_loss, has_aux=True)(
            state.images, key, Teacher(model, variables), targets, cfg, image_size, class_ids, class_mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.images)
        images = jnp.clip(optax.apply_updates(state.images, updates), lo, hi)  # valid [0, 1] pixels
        return state.replace(step=state.step + 1, images=images, opt_state=opt_state), parts

    out = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out)


def method_name(config) -> str:
    s = config.synthesis
    if s.method:
        return s.method
    if int(s.iterations) == 0:  # nothing optimised: the initial images are the set
        return "noise" if s.init == "noise" else "barycenter_real"
    name = "wmdd" if s.use_barycenter else "no_barycenter"
    if not s.per_class_bn:
        name += "_global_bn"
    if s.init == "noise":
        name += "_noise_init"
    return name


def _shard_file(out_dir: str) -> str:
    return os.path.join(out_dir, f"images.process{jax.process_index():03d}-of-{jax.process_count():03d}.npz")


def _load_images(path: str) -> np.ndarray:
    return ckpt.read_npz(path, "recover")["images"]


def recover(config, workdir: str) -> np.ndarray:
    """Stage ``recover``: optimises the synthetic set over the mesh; resumes from its last checkpoint.

    ``synthesis.iterations=0`` keeps the initial images as they are (with ``init=real``: the real
    image nearest each support point, a barycenter-selected coreset; an ablation of the optimisation).

    Returns this process's images ``[n * ipc, h, w, c]`` in [0, 1] (all classes on one process).
    Several processes each write ``synthetic/images.processP-of-N.npz`` (their classes); process 0
    joins them into ``synthetic/images.npz`` when it sees them all (a shared work directory).
    """
    out_dir = os.path.join(workdir, SYNTHETIC_DIR)
    out_file = os.path.join(out_dir, "images.npz")
    cfg = config.synthesis
    if int(cfg.iterations) < 0:
        raise UserError(f"synthesis.iterations must be >= 0 (0: the initial images, unoptimised), "
                        f"got {cfg.iterations}")
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in (*BOOKKEEPING, "method")}
    teacher = load_teacher(config, workdir)
    teacher_id = teacher_identity(teacher)
    ckpt.check_recipe(out_dir, dict(recipe, teacher=teacher_id, ipc=int(config.ipc), seed=int(config.seed)),
                      "a synthetic set")
    multi = jax.process_count() > 1
    mine = _shard_file(out_dir) if multi else out_file
    if sharding.all_processes_agree(os.path.exists(out_file) or os.path.exists(mine)):
        return _load_images(mine if os.path.exists(mine) else out_file)
    source = load_split(config.data, "train")
    C, m = source.num_classes, int(config.ipc)
    mesh = sharding.make_mesh(config.mesh)
    classes = _owned(mesh, C)
    C_pad = sharding.num_padded_classes(C, mesh)
    stats = load_statistics(os.path.join(workdir, STATS_DIR), classes)
    bc = barycenter(config, workdir, teacher_id)
    row = {k: i for i, k in enumerate(classes)}

    def by_class(arrays):  # this process's rows -> a class-sharded global array
        arrays = np.asarray(arrays)
        return sharding.class_array(mesh, C, lambda k: arrays[row[k]], arrays.shape[1:], arrays.dtype)

    if cfg.per_class_bn:
        bn_mean = {layer: by_class(v) for layer, v in stats.bn_mean.items()}
        bn_var = {layer: by_class(v) for layer, v in stats.bn_var.items()}
    else:
        running = flax.traverse_util.flatten_dict(teacher.variables["batch_stats"], sep="/")
        bn_mean = sharding.put_replicated({k[: -len("/mean")]: v for k, v in running.items()
                                           if k.endswith("/mean")}, mesh)
        bn_var = sharding.put_replicated({k[: -len("/var")]: v for k, v in running.items()
                                          if k.endswith("/var")}, mesh)
    targets = Targets(by_class(bc["support"]), bn_mean, bn_var)
    class_ids = sharding.class_array(mesh, C, lambda k: np.int32(k), (), np.int32)
    class_mask = sharding.class_array(mesh, C, lambda k: np.float32(1), ())
    variables = sharding.put_replicated(teacher.variables, mesh)

    tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, max(int(cfg.iterations), 1)), b1=0.5, b2=0.9, eps=1e-8)
    images = by_class(init_images(config, source, stats, bc["support"]).astype(np.float32))

    def fresh(images):
        return SynthesisState(step=jnp.zeros((), jnp.int32), images=images, opt_state=tx.init(images))

    shardings = sharding.tree_shardings(jax.eval_shape(fresh, images), mesh, C_pad)
    state = jax.jit(fresh, out_shardings=shardings)(images)
    manager = ckpt.manager(os.path.join(out_dir, "checkpoints"))
    state = ckpt.restore(manager, state)
    step_fn = make_synthesis_step(teacher.model, cfg, np.asarray(source.mean, np.float32),
                                  np.asarray(source.std, np.float32), source.image_shape[0], tx,
                                  seed=config.seed + 1, state_shardings=shardings)
    start, last_save, t0 = int(state.step), time.time(), time.time()
    if start:
        print(f"recover: resuming at step {start} of {cfg.iterations}")
    bar = tqdm(total=cfg.iterations, initial=start, desc=f"recover {method_name(config)}",
               disable=jax.process_index() != 0, dynamic_ncols=True, leave=False)
    try:
        for it in range(start, cfg.iterations):
            state, parts = step_fn(state, targets, variables, class_ids, class_mask)
            done = it + 1
            if done % int(cfg.log_every_steps) == 0:
                bar.set_postfix({k: f"{float(v):.3g}" for k, v in parts.items()})
            bar.update(1)
            # Time-based saves only at log steps, decided by process 0 so every process saves together.
            due = done % int(cfg.log_every_steps) == 0 and sharding.broadcast_flag(
                time.time() - last_save > cfg.checkpoint_every_secs)
            if done % int(cfg.checkpoint_every_steps) == 0 or due or done == cfg.iterations:
                ckpt.save(manager, done, state)
                last_save = time.time()
    finally:
        bar.close()
        manager.wait_until_finished()
    rows = sharding.local_class_rows(state.images, C)
    pixels = np.clip(np.asarray(denormalize(np.stack([rows[k] for k in classes]), source.mean, source.std)), 0, 1)
    pixels = pixels.reshape(len(classes) * m, *pixels.shape[2:])
    finite = np.isfinite(pixels).reshape(len(classes), -1).all(1)
    if not sharding.all_processes_agree(bool(finite.all())):  # every process stops, none waits on the others
        bad = [k for k, ok in zip(classes, finite) if not ok]
        raise UserError(f"recover: the synthetic images of classes {bad or 'on another process'} are not finite "
                        f"(the optimisation diverged); nothing was written. Lower --config.synthesis.lr (now "
                        f"{cfg.lr}) and delete {out_dir} to start it over")
    os.makedirs(out_dir, exist_ok=True)
    ckpt.write_npz(mine, images=pixels, labels=np.repeat(np.asarray(classes), m).astype(np.int32),
                   weights=(bc["weights"] * m).reshape(-1).astype(np.float32), method=np.array(method_name(config)))
    sharding.sync("wmdd_jax recover: shards written")
    if multi and jax.process_index() == 0:
        _join_shards(out_dir, out_file)
    if os.path.exists(out_file):
        save_grid(ckpt.read_npz(out_file, "recover")["images"].reshape(C, m, *pixels.shape[1:]), os.path.join(out_dir, "grid.png"))
    print(f"recover: {len(classes) * m} images in {time.time() - t0:.0f} s -> {mine}")
    return pixels


def _join_shards(out_dir: str, out_file: str) -> None:
    """Process 0: one ``images.npz`` from every process's shard, when all are visible here."""
    paths = sorted(glob.glob(os.path.join(out_dir, f"images.process*-of-{jax.process_count():03d}.npz")))
    if len(paths) != jax.process_count():
        print(f"recover: {len(paths)} of {jax.process_count()} image shards visible in {out_dir}; join them "
              f"there (a shared work directory does it by itself)")
        return
    parts = [ckpt.read_npz(p, "recover") for p in paths]
    order = np.argsort(np.concatenate([p["labels"] for p in parts]), kind="stable")
    joined = {key: np.concatenate([p[key] for p in parts])[order] for key in ("images", "labels", "weights")}
    ckpt.write_npz(out_file, **joined, method=parts[0]["method"])


def save_grid(images: np.ndarray, path: str, max_columns: int = 10, scale: int = 2) -> None:
    """PNG of ``images`` [C, m, h, w, c] in [0, 1]: one row per class, at most ``max_columns`` each."""
    from PIL import Image

    C, m, h, w, ch = images.shape
    cols = min(m, max_columns)
    grid = np.ones((C * (h + 2), cols * (w + 2), ch), np.float32)
    for k in range(C):
        for j in range(cols):
            grid[k * (h + 2) + 1 : k * (h + 2) + 1 + h, j * (w + 2) + 1 : j * (w + 2) + 1 + w] = images[k, j]
    pixels = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if ch == 1 else pixels)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
