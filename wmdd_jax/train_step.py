"""One training step and what it reads: the state, the batch plan and order, the augmented input.

`make_train_step` builds the pure, jitted ``step(state, batch...) -> (state, metrics)`` that
`wmdd_jax.train` loops over (for teachers and evaluation students alike). Every step is a pure
function of (state, batch, step): the batch order is a function of (seed, epoch) and the
augmentation key is ``fold_in(data_key(data_seed), step)``, so a resumed run repeats exactly
what an uninterrupted one computes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wmdd_jax.data import augment_batch, normalize
from wmdd_jax.models import BN_STATS
from wmdd_jax.optim import soft_label_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


class Teacher(NamedTuple):
    """A frozen model whose logits serve as soft labels."""

    model: nn.Module
    variables: Any


class Precision(NamedTuple):
    """How a training step computes: ``dtype`` float32 | bfloat16 (activations and the parameters'
    copies in the forward and backward pass; the parameters, optimizer state and BN running
    statistics stay float32), ``matmul``: ``jax.default_matmul_precision`` (default | high | highest)."""

    dtype: str = "float32"
    matmul: str = "default"

    def recipe(self) -> dict:
        """The recipe fields of a non-default precision (a default one adds none: older runs still match)."""
        return {k: v for k, v in self._asdict().items() if v != Precision._field_defaults[k]}


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    """Parameters (and BN running statistics) of a fresh model, without sown intermediates.

    One jitted program, compiled once per model and image shape (the seeds of an evaluation share
    it): run op by op, a ResNet-18's init takes about twice as long on a CPU.
    """
    # Compiler options are for top-level programs only: traced (under jit or eval_shape), the plain one.
    # The program runs where the key lies; the CPU options only for a CPU.
    quick = not isinstance(rng, jax.core.Tracer) and all(d.platform == "cpu" for d in rng.devices())
    return _init_fn(model, tuple(int(s) for s in image_shape), quick)(rng)


# The init runs once per run, so its compile time is all that counts: on a CPU, LLVM's optimization
# level 1 instead of 3 compiles a ConvNet-3's init in 0.8 s instead of 1.7 s (the random draws are
# most of it) and gives the same bits (tests/test_train.py); level 0 changes some.
_QUICK_COMPILE = {"xla_backend_optimization_level": 1}


@functools.lru_cache(maxsize=16)
def _init_fn(model: nn.Module, image_shape: tuple[int, ...], quick: bool) -> Callable:
    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        return {k: v for k, v in variables.items() if k != BN_STATS}

    return jax.jit(init, compiler_options=_QUICK_COMPILE if quick else None)


def apply_model(model: nn.Module, variables: dict, images: jax.Array, train: bool):
    """Logits and the new BN running statistics (unchanged for models without BN)."""
    if train and "batch_stats" in variables:
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]
    return model.apply(variables, images, train=train), variables.get("batch_stats", {})


def augmented_input(spec, images, mean, std, rng, step) -> jax.Array:
    """The normalised, augmented batch that step ``step`` trains on (shared with `relabel`)."""
    a = spec.augment
    x = normalize(images, mean, std)
    return augment_batch(jax.random.fold_in(rng, step), x, flip=bool(a.flip), crop_scale=a.crop_scale,
                         shift=int(a.shift), cutmix_prob=float(a.get("cutmix", 0.0)),
                         cutmix_beta=float(a.get("cutmix_beta", 1.0)))


def batch_plan(num_examples: int, spec) -> tuple[int, int]:
    """(batch size, total steps) of a run of ``spec`` over ``num_examples`` images."""
    batch_size = min(int(spec.batch_size), num_examples)
    return batch_size, int(spec.epochs) * math.ceil(num_examples / batch_size)


def data_key(data_seed: int) -> jax.Array:
    """The key of a run's augmentation stream; with `batch_indices` it fixes what each step sees."""
    return jax.random.fold_in(jax.random.key(data_seed), 1)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, spec, mean, std,
                    teacher: Teacher | None, stacked: bool = False, out_shardings: Any = None,
                    precision: Precision = Precision()) -> Callable:
    """The jitted ``step(state, images, labels, weights, data_seed, teacher_vars, stored)``.

    ``stacked``: every argument but the teacher's variables and the stored soft labels carries a
    leading run axis (`train_group`): one program steps every run, as a ``vmap`` of the same step.
    ``out_shardings``: (state's, metrics') shardings on a mesh (`wmdd_jax.placement.BatchLayout`).
    ``precision``: the compute dtype (parameters, optimizer and BN statistics stay float32) and the
    matmul/convolution precision.
    """
    soft = spec.label_mode == "soft"
    compute = jnp.dtype(precision.dtype)

    def cast(tree):
        return jax.tree.map(lambda v: v.astype(compute) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)

    def step(state: TrainState, images, labels, weights, data_seed, teacher_vars, stored):
        with jax.default_matmul_precision(precision.matmul):
            return _step(state, images, labels, weights, data_seed, teacher_vars, stored)

    def _step(state: TrainState, images, labels, weights, data_seed, teacher_vars, stored):
        x = augmented_input(spec, images, mean, std, data_key(data_seed), state.step).astype(compute)
        if not soft:
            target = None
        elif stored is not None:  # soft labels stored by `relabel` for exactly this batch
            target = stored.astype(jnp.float32)
        else:
            target = teacher.model.apply(cast(teacher_vars), x, train=False).astype(jnp.float32)
        w = weights / jnp.mean(weights)

        def loss_fn(params):
            logits, new_stats = apply_model(model, {"params": cast(params), "batch_stats": state.batch_stats}, x, True)
            logits = logits.astype(jnp.float32)
            if soft:
                per_example = soft_label_loss(logits, target, spec.temperature)
            else:
                per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.mean(w * per_example), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=new_stats, opt_state=opt_state)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
        return state, metrics

    if stacked:
        step = jax.vmap(step, in_axes=(0, 0, 0, 0, 0, None, None))
    if out_shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at ``step``: a fresh permutation each epoch, the last batch wrapped."""
    per_epoch = math.ceil(num_examples / batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm = np.resize(perm, per_epoch * batch_size)  # wraps: fixed batch shape, one compile
    return perm[i * batch_size : (i + 1) * batch_size]
