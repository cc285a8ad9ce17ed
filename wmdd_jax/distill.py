"""WMDD's distillation stages: class statistics, barycenter targets, synthesis.

``statistics(config, workdir)``  one eval-mode pass of the teacher over the real
    training images: per class, the penultimate features and, for every
    BatchNorm layer, the exact mean and (biased) variance of the layer's input.
    Written per class (``statistics/class_00007.npz``), so classes can be
    produced and read by different hosts.
``barycenter(config, workdir)``  ``barycenter.class_barycenters`` on those
    features: IPC support points and weights per class (``barycenter.npz``).
``recover(config, workdir)``  the synthetic images, optimised with Adam so that
    their teacher features land on the barycenter points, their per-class BN
    statistics on the real ones, and the teacher classifies them as their class
    (``synthetic/images.npz`` and a PNG grid, one row per class).

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
from wmdd_jax.data import Source, augment, denormalize, load_split, normalize
from wmdd_jax.errors import UserError
from wmdd_jax.models import BN_STATS, collect_bn_moments, pooled_moments
from wmdd_jax.train import Teacher

STATS_DIR, BARYCENTER_FILE, SYNTHETIC_DIR = "statistics", "barycenter.npz", "synthetic"


# --------------------------------------------------------------------------- statistics


class ClassStatistics(NamedTuple):
    """Per-class teacher statistics of the real data.

    features: per class, ``[n_k, d]`` penultimate features (eval mode, no augmentation).
    indices: per class, ``[n_k]`` indices of those images in the training source.
    bn_mean, bn_var: layer path -> ``[C, channels]`` class-conditional mean / biased variance of
      the layer's input over all images of the class and all positions.
    """

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


def class_statistics(teacher: Teacher, source: Source, *, batch_size: int = 500,
                     max_features_per_class: int = 0, seed: int = 0, verbose: bool = True) -> ClassStatistics:
    """One pass over ``source``; BN statistics pooled exactly (law of total variance, float64)."""
    C = source.num_classes
    run = _feature_fn(teacher.model)
    n = len(source)
    feats, counts = [], np.zeros(C)
    sums: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, n, batch_size), desc="statistics", disable=not verbose, leave=False):
        idx = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(idx)
        images, labels = source.get(np.concatenate([idx, np.full(pad, idx[-1])]))
        f, moments = run(teacher.variables, normalize(images, source.mean, source.std))
        f = np.asarray(f[: len(idx)])
        labels = labels[: len(idx)]
        feats.append(f)
        counts += np.bincount(labels, minlength=C)
        for layer, (m, v) in moments.items():
            m, v = np.asarray(m[: len(idx)], np.float64), np.asarray(v[: len(idx)], np.float64)
            s = sums.setdefault(layer, [np.zeros((C, m.shape[1])), np.zeros((C, m.shape[1]))])
            np.add.at(s[0], labels, m)
            np.add.at(s[1], labels, v + m * m)  # per-sample E[x^2]
    features = np.concatenate(feats)
    denom = np.maximum(counts, 1)[:, None]
    bn_mean = {k: (s[0] / denom).astype(np.float32) for k, s in sums.items()}
    bn_var = {k: np.maximum(s[1] / denom - (s[0] / denom) ** 2, 0).astype(np.float32) for k, s in sums.items()}
    rng = np.random.default_rng(seed)
    per_class, per_index = [], []
    for k in range(C):
        idx = source.class_indices(k)
        if max_features_per_class and len(idx) > max_features_per_class:
            idx = np.sort(rng.choice(idx, max_features_per_class, replace=False))
        per_class.append(features[idx])
        per_index.append(idx)
    return ClassStatistics(per_class, per_index, bn_mean, bn_var)


def save_statistics(stats: ClassStatistics, folder: str, classes: range | None = None) -> None:
    """One file per class (``classes``: the ones this process owns; default all)."""
    os.makedirs(folder, exist_ok=True)
    for k in classes if classes is not None else range(len(stats.features)):
        arrays = {"features": stats.features[k], "indices": stats.indices[k]}
        arrays.update({f"mean/{layer}": v[k] for layer, v in stats.bn_mean.items()})
        arrays.update({f"var/{layer}": v[k] for layer, v in stats.bn_var.items()})
        tmp = os.path.join(folder, f".class_{k:05d}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, os.path.join(folder, f"class_{k:05d}.npz"))


def load_statistics(folder: str, num_classes: int) -> ClassStatistics:
    paths = [os.path.join(folder, f"class_{k:05d}.npz") for k in range(num_classes)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"{len(missing)} class statistics files missing in {folder} (first: {missing[0]}): run the "
                        f"'statistics' stage with this --workdir")
    features, indices, means, variances = [], [], {}, {}
    for path in paths:
        with np.load(path) as z:
            features.append(z["features"])
            indices.append(z["indices"])
            for key in z.files:
                kind, _, layer = key.partition("/")
                if kind == "mean":
                    means.setdefault(layer, []).append(z[key])
                elif kind == "var":
                    variances.setdefault(layer, []).append(z[key])
    return ClassStatistics(features, indices, {k: np.stack(v) for k, v in means.items()},
                           {k: np.stack(v) for k, v in variances.items()})


def statistics(config, workdir: str) -> ClassStatistics:
    """Stage ``statistics``: skipped when every class file exists."""
    from wmdd_jax.teacher import load_teacher

    folder = os.path.join(workdir, STATS_DIR)
    source = load_split(config.data, "train")
    if len(glob.glob(os.path.join(folder, "class_*.npz"))) == source.num_classes:
        return load_statistics(folder, source.num_classes)
    teacher = load_teacher(config, workdir)
    t0 = time.time()
    stats = class_statistics(teacher, source, max_features_per_class=config.barycenter.max_features_per_class,
                             seed=config.seed)
    save_statistics(stats, folder)
    print(f"statistics: {len(source)} images, {len(stats.bn_mean)} BN layers, "
          f"{stats.features[0].shape[1]}-d features ({time.time() - t0:.0f} s)")
    return stats


# --------------------------------------------------------------------------- barycenter


def compute_barycenters(stats: ClassStatistics, ipc: int, bary_config, seed: int) -> bary.BarycenterOutput:
    """``class_barycenters`` over the per-class features (padded with zero weight), jitted once."""
    labels = np.concatenate([np.full(len(f), k, np.int32) for k, f in enumerate(stats.features)])
    features = np.concatenate(stats.features)
    sizes = [len(f) for f in stats.features]
    if min(sizes) < ipc:
        raise UserError(f"class {int(np.argmin(sizes))} has {min(sizes)} images, fewer than ipc={ipc}; lower "
                        f"--config.ipc or raise --config.barycenter.max_features_per_class")
    options = dict(learn_weights=bool(bary_config.learn_weights), num_iterations=int(bary_config.num_iterations))
    fn = jax.jit(functools.partial(bary.class_barycenters, num_classes=len(sizes), num_support=ipc,
                                   max_class_size=max(sizes), **options))
    return fn(features, labels, rng=jax.random.key(seed))


def barycenter(config, workdir: str) -> dict[str, np.ndarray]:
    """Stage ``barycenter``: ``barycenter.npz`` with support [C, m, d], weights [C, m], cost [C]."""
    path = os.path.join(workdir, BARYCENTER_FILE)
    if os.path.exists(path):
        with np.load(path) as z:
            return dict(z)
    source = load_split(config.data, "train")
    stats = load_statistics(os.path.join(workdir, STATS_DIR), source.num_classes)
    t0 = time.time()
    res = compute_barycenters(stats, config.ipc, config.barycenter, config.seed)
    out = {k: np.asarray(getattr(res, k)) for k in ("support", "weights", "cost", "converged")}
    np.savez(path + ".tmp.npz", **out)
    os.replace(path + ".tmp.npz", path)
    print(f"barycenter: {source.num_classes} classes x {config.ipc} points, mean W2^2 {out['cost'].mean():.4g} "
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
    """[C, m, h, w, c] normalised initial images: noise, or the real image nearest each support point."""
    C, m = support.shape[:2]
    h, w, ch = source.image_shape
    init = config.synthesis.init
    if init == "noise":
        return np.asarray(jax.random.normal(jax.random.key(config.seed), (C, m, h, w, ch)))
    if init != "real":
        raise UserError(f"synthesis.init must be 'real' or 'noise', got {init!r}")
    picks = []
    for k in range(C):
        f, b = stats.features[k], support[k]
        d = (f * f).sum(1)[:, None] - 2 * f @ b.T + (b * b).sum(1)[None]      # [n_k, m] squared distances
        chosen = []
        for j in range(m):  # greedy: each support point takes its nearest image not yet taken
            order = np.argsort(d[:, j])
            chosen.append(next(i for i in order if i not in chosen))
        picks.append(stats.indices[k][chosen])
    images, _ = source.get(np.concatenate(picks))
    return np.asarray(normalize(images, source.mean, source.std)).reshape(C, m, h, w, ch)


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


def synthesis_loss(images, rng, teacher: Teacher, targets: Targets, cfg, image_size: int, class_ids=None):
    """WMDD's objective on all classes at once; ``images`` [C, m, h, w, c].

    ``class_ids`` ([C], default ``arange(C)``) are the labels of the classes given (a shard of
    the classes passes its own).

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
    labels = jnp.repeat(class_ids, m)
    local = jnp.repeat(jnp.arange(C), m)  # position of each image's class among those given
    x = _augment(rng, images.reshape(C * m, *images.shape[2:]), cfg, image_size)
    (logits, features), state = teacher.model.apply(teacher.variables, x, train=False, return_features=True,
                                                    mutable=[BN_STATS])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum() / (g * m)

    class_group = jnp.arange(C) // g
    sq = jnp.sum(jnp.square(features - targets.support.reshape(C * m, -1)), axis=-1).reshape(C, m).sum(1)
    feature = jnp.sum(jnp.sqrt(jax.ops.segment_sum(sq, class_group, groups) + 1e-12))

    bn = 0.0
    for i, (layer, (mu_i, var_i)) in enumerate(collect_bn_moments(state).items()):
        weight = cfg.first_bn_multiplier if i == 0 else 1.0
        if cfg.per_class_bn:
            mu, var = pooled_moments(mu_i, var_i, local, C)                  # [C, ch]
            per = (jnp.linalg.norm(targets.bn_var[layer] - var, axis=-1)
                   + jnp.linalg.norm(targets.bn_mean[layer] - mu, axis=-1))  # [C]
            bn += weight * jnp.sum(per) / g
        else:  # SRe2L: each batch's statistics against the teacher's running statistics
            mu, var = pooled_moments(mu_i, var_i, jnp.repeat(class_group, m), groups)
            per = (jnp.linalg.norm(targets.bn_var[layer] - var, axis=-1)
                   + jnp.linalg.norm(targets.bn_mean[layer] - mu, axis=-1))
            bn += weight * jnp.sum(per)
    feature_term = feature if cfg.use_barycenter else 0.0
    total = cfg.r_wb * ce + feature_term + cfg.r_bn * bn
    return total, {"ce": ce, "feature": feature, "bn": bn}


def make_synthesis_step(teacher: Teacher, cfg, mean, std, image_size: int, tx):
    lo, hi = normalize(jnp.zeros(()), mean, std), normalize(jnp.ones(()), mean, std)

    def step(state: SynthesisState, rng, targets: Targets):
        key = jax.random.fold_in(rng, state.step)
        (_, parts), grads = jax.value_and_grad(synthesis_loss, has_aux=True)(
            state.images, key, teacher, targets, cfg, image_size)
        updates, opt_state = tx.update(grads, state.opt_state, state.images)
        images = jnp.clip(optax.apply_updates(state.images, updates), lo, hi)  # valid [0, 1] pixels
        return state.replace(step=state.step + 1, images=images, opt_state=opt_state), parts

    return jax.jit(step, donate_argnums=(0,))


def method_name(config) -> str:
    s = config.synthesis
    if s.method:
        return s.method
    name = "wmdd" if s.use_barycenter else "no_barycenter"
    if not s.per_class_bn:
        name += "_global_bn"
    if s.init == "noise":
        name += "_noise_init"
    return name


def recover(config, workdir: str) -> np.ndarray:
    """Stage ``recover``: optimises the synthetic set; resumes from its last checkpoint."""
    from wmdd_jax.teacher import load_teacher

    out_dir = os.path.join(workdir, SYNTHETIC_DIR)
    out_file = os.path.join(out_dir, "images.npz")
    if os.path.exists(out_file):
        with np.load(out_file) as z:
            return z["images"]
    cfg = config.synthesis
    source = load_split(config.data, "train")
    stats = load_statistics(os.path.join(workdir, STATS_DIR), source.num_classes)
    bc = barycenter(config, workdir)
    teacher = load_teacher(config, workdir)
    C, m = bc["support"].shape[:2]
    if cfg.per_class_bn:
        bn_mean, bn_var = stats.bn_mean, stats.bn_var
    else:
        running = flax.traverse_util.flatten_dict(teacher.variables["batch_stats"], sep="/")
        bn_mean = {k[: -len("/mean")]: v for k, v in running.items() if k.endswith("/mean")}
        bn_var = {k[: -len("/var")]: v for k, v in running.items() if k.endswith("/var")}
    targets = Targets(jnp.asarray(bc["support"]), bn_mean, bn_var)

    tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.iterations), b1=0.5, b2=0.9, eps=1e-8)
    images = jnp.asarray(init_images(config, source, stats, bc["support"]))
    state = SynthesisState(step=jnp.zeros((), jnp.int32), images=images, opt_state=tx.init(images))
    manager = ckpt.manager(os.path.join(out_dir, "checkpoints"))
    state = ckpt.restore(manager, state)
    step_fn = make_synthesis_step(teacher, cfg, np.asarray(source.mean, np.float32),
                                  np.asarray(source.std, np.float32), source.image_shape[0], tx)
    rng = jax.random.key(config.seed + 1)
    start, last_save, t0 = int(state.step), time.time(), time.time()
    bar = tqdm(total=cfg.iterations, initial=start, desc=f"recover {method_name(config)}",
               disable=jax.process_index() != 0, dynamic_ncols=True, leave=False)
    try:
        for it in range(start, cfg.iterations):
            state, parts = step_fn(state, rng, targets)
            done = it + 1
            if done % int(cfg.log_every_steps) == 0:
                bar.set_postfix({k: f"{float(v):.3g}" for k, v in parts.items()})
            bar.update(1)
            if (done % int(cfg.checkpoint_every_steps) == 0 or time.time() - last_save > cfg.checkpoint_every_secs
                    or done == cfg.iterations):
                ckpt.save(manager, done, state)
                last_save = time.time()
    finally:
        bar.close()
        manager.wait_until_finished()
    pixels = np.asarray(denormalize(state.images, source.mean, source.std)).clip(0, 1)
    pixels = pixels.reshape(C * m, *pixels.shape[2:])
    weights = (bc["weights"] * m).reshape(-1).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    np.savez(out_file + ".tmp.npz", images=pixels, labels=np.repeat(np.arange(C), m).astype(np.int32),
             weights=weights, method=np.array(method_name(config)))
    os.replace(out_file + ".tmp.npz", out_file)
    save_grid(pixels.reshape(C, m, *pixels.shape[1:]), os.path.join(out_dir, "grid.png"))
    print(f"recover: {C * m} images in {time.time() - t0:.0f} s -> {out_file}")
    return pixels


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
