"""Predictions of a trained model over a whole split (test accuracy, per-class scores)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.data import Source, normalize


@functools.lru_cache(maxsize=16)
def _predict_fn(model: nn.Module, stacked: bool):
    def predict(variables, images, mean, std):
        return jnp.argmax(model.apply(variables, normalize(images, mean, std), train=False), -1)
    return jax.jit(jax.vmap(predict, in_axes=(0, None, None, None)) if stacked else predict)


def _normalization(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """``source``'s per-channel mean and std as the prediction program takes them (float32 arrays)."""
    return np.asarray(source.mean, np.float32), np.asarray(source.std, np.float32)


def compile_predict(model: nn.Module, variables: dict, source: Source, batch_size: int = 500,
                    stacked: bool = False) -> None:
    """Compiles the program `predict_classes` runs for these arguments, without running it (its later
    calls find it in jit's cache), e.g. on a helper thread before the models have trained
    (`wmdd_jax.train.train_group`'s concurrent runs). ``variables`` may be ``jax.ShapeDtypeStruct``
    leaves; their shardings must be those of the arrays predicted with, or the call compiles again."""
    image, _ = source.get(np.zeros(1, np.int64))
    images = jax.ShapeDtypeStruct((batch_size, *image.shape[1:]), image.dtype)
    mean, std = _normalization(source)
    _predict_fn(model, stacked).lower(variables, images, mean, std).compile()


def predict_classes(model: nn.Module, variables: dict, source: Source, batch_size: int = 500,
                    stacked: bool = False) -> np.ndarray:
    """``[len(source)]`` predicted classes of all of ``source``; last batch padded, one compile per model.

    ``stacked``: ``variables`` of several models on a leading axis (`wmdd_jax.train.train_group`),
    predicted in one program: ``[models, len(source)]``.
    """
    predict = _predict_fn(model, stacked)
    mean, std = _normalization(source)
    n, out = len(source), []
    for start in range(0, n, batch_size):
        images, _ = source.get(np.minimum(np.arange(start, start + batch_size), n - 1))
        out.append(predict(variables, images, mean, std))
    return np.concatenate([np.asarray(p) for p in out], axis=-1)[..., :n]


def evaluate_accuracy(model: nn.Module, variables: dict, source: Source, batch_size: int = 500,
                      stacked: bool = False) -> float | list[float]:
    """Top-1 accuracy (%) of ``model`` on all of ``source`` (a list, one per model, when ``stacked``)."""
    correct = predict_classes(model, variables, source, batch_size, stacked) == source.labels
    accuracy = 100.0 * np.mean(correct, axis=-1)
    return [float(a) for a in accuracy] if stacked else float(accuracy)
