"""One supervised training loop, for teachers and for evaluation students.

``train(model, spec, source, workdir, ...)`` trains ``model`` on ``source``
with the optimizer, schedule, augmentation and labels that ``spec`` (a config
section, see ``configs/default.py``: ``teacher`` / ``eval.hard`` / ``eval.soft``)
describes. Labels are hard (cross-entropy) or soft (KL to a teacher run online
on the same augmented batch, temperature ``spec.temperature``).

Every step is a pure function of (state, batch, step): the batch order is a
function of (seed, epoch) and the augmentation key is ``fold_in(seed, step)``,
so a run killed at any point and resumed from its last checkpoint ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from wmdd_jax import checkpoint as ckpt
from wmdd_jax import files
from wmdd_jax.data import Source, augment_batch, normalize
from wmdd_jax.errors import UserError
from wmdd_jax.models import BN_STATS


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


class TrainResult(NamedTuple):
    variables: dict
    test_accuracy: float | None
    steps: int
    seconds: float


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...]) -> dict:
    """Parameters (and BN running statistics) of a fresh model, without sown intermediates.

    One jitted program: run op by op, a ResNet-18's init takes about twice as long on a CPU.
    """
    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        return {k: v for k, v in variables.items() if k != BN_STATS}

    return jax.jit(init)(rng)


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
                    teacher: Teacher | None) -> Callable:
    soft = spec.label_mode == "soft"

    def step(state: TrainState, images, labels, weights, rng, teacher_vars, stored):
        x = augmented_input(spec, images, mean, std, rng, state.step)
        if not soft:
            target = None
        elif stored is not None:  # soft labels stored by `relabel` for exactly this batch
            target = stored.astype(jnp.float32)
        else:
            target = teacher.model.apply(teacher_vars, x, train=False)
        w = weights / jnp.mean(weights)

        def loss_fn(params):
            logits, new_stats = apply_model(model, {"params": params, "batch_stats": state.batch_stats}, x, True)
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

    return jax.jit(step, donate_argnums=(0,))


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at ``step``: a fresh permutation each epoch, the last batch wrapped."""
    per_epoch = math.ceil(num_examples / batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm = np.resize(perm, per_epoch * batch_size)  # wraps: fixed batch shape, one compile
    return perm[i * batch_size : (i + 1) * batch_size]


@functools.lru_cache(maxsize=16)
def _predict_fn(model: nn.Module):
    @jax.jit
    def predict(variables, images, mean, std):
        return jnp.argmax(model.apply(variables, normalize(images, mean, std), train=False), -1)
    return predict


def predict_classes(model: nn.Module, variables: dict, source: Source, batch_size: int = 500) -> np.ndarray:
    """``[len(source)]`` predicted classes of all of ``source``; last batch padded, one compile per model."""
    predict = _predict_fn(model)
    mean, std = np.asarray(source.mean, np.float32), np.asarray(source.std, np.float32)
    n, out = len(source), []
    for start in range(0, n, batch_size):
        images, _ = source.get(np.minimum(np.arange(start, start + batch_size), n - 1))
        out.append(predict(variables, images, mean, std))
    return np.concatenate([np.asarray(p) for p in out])[:n]


def evaluate_accuracy(model: nn.Module, variables: dict, source: Source, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` on all of ``source``."""
    return 100.0 * float(np.mean(predict_classes(model, variables, source, batch_size) == source.labels))


def train(model: nn.Module, spec, source: Source, workdir: str, *, seed: int,
          test_source: Source | None = None, teacher: Teacher | None = None,
          weights: np.ndarray | None = None, stored_targets: np.ndarray | None = None,
          data_seed: int | None = None, desc: str = "train", verbose: bool = True,
          config_key: str = "", inputs: dict | None = None) -> TrainResult:
    """Trains ``model`` from scratch (or resumes in ``workdir``) and tests it.

    Args:
      spec: a training config section (optimizer, lr, momentum, weight_decay, schedule,
        epochs, batch_size, augment, label_mode, temperature, checkpoint_every_steps,
        checkpoint_every_secs, log_every_steps).
      source: the training images; ``weights`` ([len(source)]) weights each image's loss.
      workdir: checkpoints, ``metrics.jsonl`` and ``result.json`` go here. A finished run
        (``result.json`` present) is loaded, not retrained.
      seed: initialisation; ``data_seed`` (default ``seed``): batch order and augmentation.
      stored_targets: soft labels from `wmdd_jax.relabel` ([total_steps, batch, classes]), made
        with the same ``data_seed``; they replace the online teacher.
      config_key: where ``spec`` sits in the config (e.g. ``teacher``, ``eval.soft``), for messages.
      inputs: fingerprints of what the run learns from (e.g. ``{"teacher": ..., "images": ...}``),
        recorded in its recipe: a finished run is reused only for the same inputs.

    Raises:
      UserError: when the loss becomes NaN or infinite (nothing of the diverged run is saved).
    """
    os.makedirs(workdir, exist_ok=True)
    result_path = os.path.join(workdir, "result.json")
    n = len(source)
    batch_size, total_steps = batch_plan(n, spec)
    if float(spec.augment.get("cutmix", 0.0)) > 0 and spec.label_mode != "soft":
        raise UserError("augment.cutmix mixes images, not labels: it needs label_mode 'soft' (a teacher labels "
                        "the mixed images); set augment.cutmix=0 for hard labels")
    if spec.label_mode == "soft" and teacher is None and stored_targets is None:
        raise ValueError("label_mode 'soft' needs a teacher or stored soft labels")
    if stored_targets is not None and stored_targets.shape[:2] != (total_steps, batch_size):
        raise ValueError(f"stored soft labels are for {stored_targets.shape[:2]} (steps, batch), "
                         f"this run is {(total_steps, batch_size)}")
    data_seed = seed if data_seed is None else data_seed
    recipe = {k: v for k, v in spec.to_dict().items() if k not in BOOKKEEPING}
    ckpt.check_recipe(workdir, dict(recipe, seed=seed, data_seed=data_seed, num_examples=n,
                                    stored_soft_labels=stored_targets is not None, **(inputs or {})),
                      "a training run")
    init_rng, step_rng = jax.random.key(seed), data_key(data_seed)
    variables = init_variables(model, init_rng, source.image_shape)
    tx = make_optimizer(spec, total_steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]))
    final_path = os.path.join(workdir, "final")
    # A result cut off by a kill (older runs wrote it in place) is redone from the last checkpoint.
    done = files.read_json(result_path, what="a finished run's result")
    if done is not None and os.path.exists(final_path):
        variables = ckpt.load_tree(final_path, _variables(state))
        return TrainResult(variables, done.get("test_accuracy"), total_steps, done.get("seconds", 0.0))
    manager = ckpt.manager(os.path.join(workdir, "checkpoints"))

    state = ckpt.restore(manager, state)
    start = int(state.step)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _truncate_metrics(metrics_path, start)

    step_fn = make_train_step(model, tx, spec, np.asarray(source.mean, np.float32),
                              np.asarray(source.std, np.float32), teacher)
    teacher_vars = teacher.variables if teacher is not None else None
    weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    log_every = int(spec.log_every_steps)
    t0, last_save = time.time(), time.time()
    bar = tqdm(total=total_steps, initial=start, desc=desc, disable=not verbose or jax.process_index() != 0,
               dynamic_ncols=True, leave=False)
    running, unchecked = [], []

    def check_finite(params=None):  # before anything is logged or saved: a diverged state must not be kept
        bad = next((s for s, loss in unchecked if not np.isfinite(float(loss))), None)
        if bad is None and params is not None and not all_finite(params):
            bad = unchecked[-1][0] if unchecked else start  # the last update gave non-finite weights
        unchecked.clear()
        if bad is not None:
            key = f"--config.{config_key}.lr" if config_key else "the learning rate (lr)"
            raise UserError(f"{desc}: the training loss became non-finite at step {bad} of {total_steps}; the run "
                            f"diverged: lower {key} (now {spec.lr}), then rerun (the last good checkpoint in "
                            f"{workdir} is kept)")

    try:
        with open(metrics_path, "a") as metrics_file:
            for step in range(start, total_steps):
                idx = batch_indices(n, batch_size, step, data_seed)
                images, labels = source.get(idx)
                stored = stored_targets[step] if stored_targets is not None else None
                state, metrics = step_fn(state, images, labels, weights[idx], step_rng, teacher_vars, stored)
                running.append(metrics)
                done_steps = step + 1
                unchecked.append((done_steps, metrics["loss"]))
                if done_steps % log_every == 0 or done_steps == total_steps:
                    check_finite()
                    m = {k: float(np.mean([float(r[k]) for r in running])) for k in running[0]}
                    running = []
                    metrics_file.write(json.dumps({"step": done_steps, **m}) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{100 * m['accuracy']:.1f}")
                bar.update(1)
                if (done_steps % int(spec.checkpoint_every_steps) == 0
                        or time.time() - last_save > float(spec.checkpoint_every_secs)
                        or done_steps == total_steps):
                    check_finite(state.params)
                    ckpt.save(manager, done_steps, state)
                    last_save = time.time()
    finally:  # an interrupted run still finishes writing the checkpoint in flight
        bar.close()
        manager.wait_until_finished()
    seconds = time.time() - t0
    variables = _variables(state)
    ckpt.save_tree(final_path, variables)
    accuracy = evaluate_accuracy(model, variables, test_source) if test_source is not None else None
    # seconds and images/s cover this process's part of the run (from step ``resumed_from``).
    files.write_json(result_path, {"test_accuracy": accuracy, "steps": total_steps, "seconds": seconds,
                                   "resumed_from": start,
                                   "images_per_s": (total_steps - start) * batch_size / max(seconds, 1e-9)})
    return TrainResult(variables, accuracy, total_steps, seconds)


def all_finite(tree) -> bool:
    """Whether every leaf of ``tree`` is free of NaN and infinity (one device reduction, one host sync)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(jnp.all(jnp.stack(leaves))) if leaves else True


# Config keys that change how a run is logged or saved, not what it computes.
BOOKKEEPING = ("checkpoint_every_steps", "checkpoint_every_secs", "log_every_steps")


def _variables(state: TrainState) -> dict:
    out = {"params": state.params}
    if state.batch_stats:
        out["batch_stats"] = state.batch_stats
    return out


def _truncate_metrics(path: str, step: int) -> None:
    """Drops metric lines logged after the checkpoint a run resumes from, and a line cut off by a kill."""
    if os.path.exists(path):
        files.write_jsonl(path, [row for row in files.read_jsonl(path) if row.get("step", 0) <= step])
