"""WMDD's synthesis objective and its optimisation step (the official loss, all classes at once).

``synthesis_loss`` = ``r_wb`` x cross-entropy + feature term (the synthetic images' teacher features
against their barycenter points) + ``r_bn`` x per-class BatchNorm-statistic term; see its docstring
for how the official batches of 100 images are kept whatever number of classes runs at once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from wmdd_jax.data import augment, normalize
from wmdd_jax.models import BN_STATS, collect_bn_moments, pooled_moments
from wmdd_jax.train_step import Teacher


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
    g = batch_size / m whole classes (fewer in the last group, and all classes in one group when
    there are fewer than g). Summing the official loss over such class groups keeps every image's
    gradient what it is there, whatever number of classes runs at once:
      CE: sum over groups of the mean cross-entropy over the group's images;
      feature: sum over groups of the Frobenius norm of the group's feature differences;
      BN: sum over groups of the mean over its classes of ||var_t - var|| + ||mean_t - mean||.
    A group's means divide by the real classes in it (padded classes count for nothing).
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
    class_group = jnp.arange(C) // g
    count = jax.ops.segment_sum(mask, class_group, groups)  # real classes per group
    group_has_class = count > 0  # False: a group of padding only

    def group_means(per_class):  # [C] -> sum over groups of the group's mean over its classes
        return jnp.sum(jax.ops.segment_sum(per_class * mask, class_group, groups) / jnp.maximum(count, 1))

    ce_per_image = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce = group_means(ce_per_image.reshape(C, m).mean(1))
    sq = jnp.sum(jnp.square(features - targets.support.reshape(C * m, -1)), axis=-1).reshape(C, m).sum(1)
    feature = jnp.sum(jnp.sqrt(jax.ops.segment_sum(sq * mask, class_group, groups) + 1e-12) * group_has_class)

    bn = 0.0
    local = jnp.repeat(jnp.arange(C), m)  # position of each image's class among those given
    for i, (layer, (mu_i, var_i)) in enumerate(collect_bn_moments(state).items()):
        weight = cfg.first_bn_multiplier if i == 0 else 1.0
        if cfg.per_class_bn:
            mu, var = pooled_moments(mu_i, var_i, local, C)                  # [C, ch]
            per = _norm(targets.bn_var[layer] - var) + _norm(targets.bn_mean[layer] - mu)  # [C]
            bn += weight * group_means(per)
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


