"""Dataset registry: ``load_split(data_config, split)`` returns a `Source`.

Registered names: ``fashion_mnist`` (idx files, in memory) and the
tensorflow-datasets sets ``cifar10``, ``cifar100``, ``imagenette``,
``imagenet2012``, ``tiny_imagenet`` (read through ``tfds.data_source`` over
array_record, no TensorFlow needed).

Splits: ``train``, ``test`` and, when ``data.validation_per_class > 0``,
``validation``: that many images per class held out of ``train`` (for tuning;
``train`` then excludes them), chosen by ``data.validation_seed``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from wmdd_jax.data.augment import augment_batch
from wmdd_jax.data.base import (ArraySource, Source, denormalize, group_by_class, load_all, normalize,
                                random_subset, to_float)
from wmdd_jax.data.fashion_mnist import load_fashion_mnist
from wmdd_jax.errors import UserError

_LOADERS: dict[str, Callable[..., Source]] = {}


def register(name: str):
    """Decorator adding a ``loader(split, data_config) -> Source`` under ``name``."""
    def wrap(fn):
        _LOADERS[name] = fn
        return fn
    return wrap


@register("fashion_mnist")
def _fashion_mnist(split: str, data_config) -> Source:
    return load_fashion_mnist(split, data_config.get("data_dir", ""))


def _tfds_loader(name: str):
    def load(split: str, data_config) -> Source:
        from wmdd_jax.data import tfds_sources  # imports tfds only when needed

        return tfds_sources.load(name, split, data_config)
    return load


for _name in ("cifar10", "cifar100", "imagenette", "imagenet2012", "tiny_imagenet"):
    register(_name)(_tfds_loader(_name))


def available() -> list[str]:
    return sorted(_LOADERS)


def load_split(data_config, split: str) -> Source:
    """The ``train`` / ``validation`` / ``test`` split of ``data_config.name``."""
    name = data_config.name
    if name not in _LOADERS:
        raise UserError(f"unknown dataset {name!r}; --config.data.name takes one of {available()}")
    if split not in ("train", "validation", "test"):
        raise UserError(f"unknown split {split!r}; use train, validation or test")
    holdout = int(data_config.get("validation_per_class", 0))
    if split == "validation" and holdout <= 0:
        raise UserError("no validation split: set --config.data.validation_per_class to hold some "
                        "training images out")
    source = _LOADERS[name]("test" if split == "test" else "train", data_config)
    labels = np.asarray(source.labels)
    outside = labels[(labels < 0) | (labels >= source.num_classes)]
    if outside.size:  # a class id past the model's outputs would be dropped or wrap around silently
        raise UserError(f"{source.name} has {outside.size} labels outside [0, {source.num_classes}) (e.g. "
                        f"{sorted(set(outside.tolist()))[:5]}): the label files are damaged or of another "
                        f"dataset; re-install them")
    if split == "test" or holdout <= 0:
        return source
    smallest = min(len(source.class_indices(k)) for k in range(source.num_classes))
    if holdout >= smallest:
        raise UserError(f"data.validation_per_class={holdout} leaves no training images in a class of "
                        f"{smallest}; lower --config.data.validation_per_class")
    rng = np.random.default_rng(int(data_config.get("validation_seed", 0)))
    val = np.concatenate([rng.choice(source.class_indices(k), holdout, replace=False)
                          for k in range(source.num_classes)])
    keep = np.sort(val) if split == "validation" else np.setdiff1d(np.arange(len(source)), val)
    return IndexedSource(source, keep, f"{source.name}:{split}")


class IndexedSource:
    """A view of some indices of another source."""

    def __init__(self, base: Source, indices: np.ndarray, name: str):
        self.base, self.indices, self.name = base, np.asarray(indices), name
        self.num_classes, self.mean, self.std = base.num_classes, base.mean, base.std
        self._labels = base.labels[self.indices]
        self._by_class = group_by_class(self._labels, self.num_classes)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_shape(self):
        return self.base.image_shape

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def get(self, indices):
        return self.base.get(self.indices[np.asarray(indices)])

    def class_indices(self, k: int) -> np.ndarray:
        return self._by_class[k]


__all__ = ["ArraySource", "IndexedSource", "Source", "augment_batch", "available", "denormalize", "load_all",
           "load_split", "normalize", "random_subset", "register", "to_float"]
