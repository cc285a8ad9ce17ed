"""Optimizers, learning-rate schedules and the soft-label loss of the training recipes (config ``spec``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_schedule(spec, total_steps: int) -> optax.Schedule:
    if spec.schedule == "cosine":
        return optax.cosine_decay_schedule(spec.lr, max(total_steps, 1))
    if spec.schedule == "step":  # the DC/DM evaluation protocol: lr / 10 at half of training
        return optax.piecewise_constant_schedule(spec.lr, {max(total_steps // 2, 1): 0.1})
    if spec.schedule == "constant":
        return optax.constant_schedule(spec.lr)
    raise ValueError(f"schedule must be cosine, step or constant, got {spec.schedule!r}")


def make_optimizer(spec, total_steps: int) -> optax.GradientTransformation:
    lr = make_schedule(spec, total_steps)
    if spec.optimizer == "sgd":
        # PyTorch's SGD couples weight decay into the gradient before momentum.
        return optax.chain(optax.add_decayed_weights(spec.weight_decay), optax.sgd(lr, momentum=spec.momentum))
    if spec.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return optax.adam(lr)
    raise ValueError(f"optimizer must be sgd, adamw or adam, got {spec.optimizer!r}")


def soft_label_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Per-example KL(softmax(t/T) || softmax(s/T)), summed over classes, no T^2 factor (SRe2L/WMDD)."""
    t = jax.nn.log_softmax(teacher_logits / temperature)
    s = jax.nn.log_softmax(student_logits / temperature)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)
