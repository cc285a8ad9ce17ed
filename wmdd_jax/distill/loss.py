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
from jax.sharding import PartitionSpec

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
                   class_mask=None, spread=None):
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

    ``spread``: ``(axis names, position of this device's first class, groups in all)`` inside a
    ``shard_map`` whose devices hold fewer classes than a group (`synthesis_grad_fn`): the groups' sums
    are then added across those axes, and the loss returned is that of every device's classes.
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
    if spread is None:
        axes, class_group = None, jnp.arange(C) // g
    else:
        axes, first, groups = spread
        class_group = (first + jnp.arange(C)) // g

    def group_sum(per_class):  # [C, ...] -> [groups, ...], over every device of ``spread``
        sums = jax.ops.segment_sum(per_class, class_group, groups)
        return sums if axes is None else jax.lax.psum(sums, axes)

    count = group_sum(mask)  # real classes per group
    group_has_class = count > 0  # False: a group of padding only

    def group_means(per_class):  # [C] -> sum over groups of the group's mean over its classes
        return jnp.sum(group_sum(per_class * mask) / jnp.maximum(count, 1))

    ce_per_image = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce = group_means(ce_per_image.reshape(C, m).mean(1))
    sq = jnp.sum(jnp.square(features - targets.support.reshape(C * m, -1)), axis=-1).reshape(C, m).sum(1)
    feature = jnp.sum(jnp.sqrt(group_sum(sq * mask) + 1e-12) * group_has_class)

    bn = 0.0
    local = jnp.repeat(jnp.arange(C), m)  # position of each image's class among those given
    for i, (layer, (mu_i, var_i)) in enumerate(collect_bn_moments(state).items()):
        weight = cfg.first_bn_multiplier if i == 0 else 1.0
        if cfg.per_class_bn:
            mu, var = pooled_moments(mu_i, var_i, local, C)                  # [C, ch]
            per = _norm(targets.bn_var[layer] - var) + _norm(targets.bn_mean[layer] - mu)  # [C]
            bn += weight * group_means(per)
        else:  # SRe2L: each batch's statistics against the teacher's running statistics
            mu, var = pooled_moments(mu_i, var_i, jnp.repeat(class_group, m), groups, weights=image_mask,
                                     axis_names=axes)
            per = _norm(targets.bn_var[layer] - var) + _norm(targets.bn_mean[layer] - mu)
            bn += weight * jnp.sum(per * group_has_class)
    feature_term = feature if cfg.use_barycenter else 0.0
    total = cfg.r_wb * ce + feature_term + cfg.r_bn * bn
    return total, {"ce": ce, "feature": feature, "bn": bn}


def classes_per_group(cfg, ipc: int, num_classes: int) -> int:
    """Classes per official batch of ``cfg.batch_size`` images (`synthesis_loss`), at most ``num_classes``.

    The loss is a sum over these groups, so a device or a chunk that holds whole groups computes its
    part and its gradient alone: the class axis is laid out in whole groups (`wmdd_jax.sharding`'s
    ``group``).
    """
    return min(max(1, int(cfg.batch_size) // int(ipc)), int(num_classes))


def class_layout(cfg, ipc: int, num_classes: int, num_devices: int) -> tuple[int, bool]:
    """``(group, spread)``: how the class axis lies on ``num_devices`` devices for the synthesis.

    When every device can hold a whole group (`classes_per_group`), each holds whole groups
    (``group`` for `wmdd_jax.sharding.num_padded_classes`) and computes its loss alone (``spread``
    False). Otherwise (fewer classes than devices times a group: a device then holds fewer images than
    one official batch) the classes are split evenly and the groups' sums are added across devices.
    """
    g = classes_per_group(cfg, ipc, num_classes)
    if num_devices == 1 or num_classes >= num_devices * g:
        return g, False
    return 1, True


def chunk_classes(cfg, ipc: int, local_classes: int, group: int, platform: str) -> int:
    """Classes per chunk of a device's synthesis step: whole groups that divide ``local_classes``.

    ``cfg.chunk_images`` images at most (0: all of a device's classes at once on a CPU, where memory is
    plentiful and one large batch is fastest; ``cfg.batch_size``, the official batch, on GPU and TPU, so
    that a device's memory does not grow with its number of classes).
    """
    images = int(cfg.get("chunk_images", 0)) or (local_classes * ipc if platform == "cpu" else int(cfg.batch_size))
    if local_classes % group:
        return local_classes
    groups = local_classes // group
    most = max(1, images // (ipc * group))
    return group * max(d for d in range(1, groups + 1) if groups % d == 0 and d <= most)


def synthesis_grad(images, rng, teacher: Teacher, targets: Targets, cfg, image_size: int, class_ids, class_mask,
                   chunk: int):
    """(gradient of `synthesis_loss` with respect to ``images``, loss parts), ``chunk`` classes at a time.

    ``images`` [C, m, ...] with C a multiple of ``chunk`` and every chunk whole groups
    (`classes_per_group`): the loss is a sum over groups, so the chunks' parts add up to the loss of all
    C classes and each chunk's gradient is that of the whole loss. The chunks run in sequence (one
    forward and backward pass of ``chunk * m`` images each); the activations of one chunk are live at a time.
    """
    grad_fn = jax.value_and_grad(synthesis_loss, has_aux=True)
    C = images.shape[0]
    if chunk >= C:
        (_, parts), grads = grad_fn(images, rng, teacher, targets, cfg, image_size, class_ids, class_mask)
        return grads, parts
    g = max(1, int(cfg.batch_size) // images.shape[1])
    if C % chunk or chunk % g:
        raise ValueError(f"a chunk of {chunk} classes must divide the {C} classes given and hold whole groups of "
                         f"{g} classes (synthesis.batch_size / ipc)")
    split = lambda x: x.reshape(C // chunk, chunk, *x.shape[1:])  # noqa: E731
    per_class_bn = bool(cfg.per_class_bn)
    bn = (targets.bn_mean, targets.bn_var)

    def one(args):
        x, support, bn_chunk, ids, mask = args
        mean, var = bn_chunk if per_class_bn else bn
        (_, parts), grads = grad_fn(x, rng, teacher, Targets(support, mean, var), cfg, image_size, ids, mask)
        return grads, parts

    chunks = (split(images), split(targets.support), jax.tree.map(split, bn) if per_class_bn else None,
              split(class_ids), split(class_mask))
    grads, parts = jax.lax.map(one, chunks)
    return grads.reshape(images.shape), jax.tree.map(lambda p: p.sum(0), parts)


def synthesis_grad_fn(model, cfg, image_size: int, mesh=None, chunk: int | None = None, spread: bool = False):
    """``grad(images, key, variables, targets, class_ids, class_mask) -> (gradient, loss parts)``.

    With ``mesh`` it is a ``shard_map`` over it: each device takes the gradient of its own classes
    (``chunk`` at a time, `synthesis_grad`), pooling their BN moments where they lie, and only the
    scalar loss parts are summed across devices. The class axis is laid out as `class_layout` says:
    in whole groups, or with ``spread`` groups whose sums are added across devices (no chunks then).
    ``chunk``: classes per chunk (default: all of a device's classes at once).
    """
    if spread and chunk:
        raise ValueError("groups spread over devices are computed whole: pass no chunk with spread=True")

    def local_grad(images, key, variables, targets, class_ids, class_mask):
        return synthesis_grad(images, key, Teacher(model, variables), targets, cfg, image_size, class_ids,
                              class_mask, chunk or images.shape[0])

    if mesh is None:
        return local_grad
    axes = tuple(mesh.axis_names)
    classes, whole = PartitionSpec(axes), PartitionSpec()
    bn_spec = classes if cfg.per_class_bn else whole

    def device_grad(images, key, variables, targets, class_ids, class_mask):
        # The teacher's weights as per-device values: the custom backward passes of the CPU kernels
        # (Winograd, BatchNorm) return per-device weight cotangents, which must match their inputs' type.
        # Nothing crosses devices for it: the weights' gradient is never used.
        variables = jax.lax.pcast(variables, axes, to="varying")
        if not spread:
            grads, parts = local_grad(images, key, variables, targets, class_ids, class_mask)
            return grads, jax.lax.psum(parts, axes)
        C_local = images.shape[0]
        g = max(1, int(cfg.batch_size) // images.shape[1])
        where = (axes, jax.lax.axis_index(axes) * C_local, -(-C_local * mesh.size // g))
        (_, parts), grads = jax.value_and_grad(synthesis_loss, has_aux=True)(
            images, key, Teacher(model, variables), targets, cfg, image_size, class_ids, class_mask, where)
        return grads, parts  # the loss of every device's classes already

    return jax.shard_map(device_grad, mesh=mesh, out_specs=(classes, whole),
                         in_specs=(classes, whole, whole, Targets(classes, bn_spec, bn_spec), classes, classes))


def make_synthesis_step(model, cfg, mean, std, image_size: int, tx, seed: int, state_shardings=None, mesh=None,
                        chunk: int | None = None, spread: bool = False):
    """``step(state, targets, variables, class_ids, class_mask) -> (state, loss parts)``, one jit.

    The gradient is `synthesis_grad_fn`'s (``mesh``, ``chunk``, ``spread`` as there). With
    ``state_shardings`` the new state keeps the class sharding of the old (the Adam update is
    elementwise: each device updates its own classes).
    """
    lo, hi = normalize(jnp.zeros(()), mean, std), normalize(jnp.ones(()), mean, std)
    grad = synthesis_grad_fn(model, cfg, image_size, mesh, chunk, spread)

    def step(state: SynthesisState, targets: Targets, variables, class_ids, class_mask):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        grads, parts = grad(state.images, key, variables, targets, class_ids, class_mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.images)
        images = jnp.clip(optax.apply_updates(state.images, updates), lo, hi)  # valid [0, 1] pixels
        return state.replace(step=state.step + 1, images=images, opt_state=opt_state), parts

    out = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out)
