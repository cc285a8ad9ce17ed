"""The dataset interface every stage reads: random access by index, and by class.

Distillation works class by class, so ``class_indices(k)`` is a first-class
operation. Images come out as float32 in [0, 1], ``[n, h, w, c]``; models see
them normalised with the source's ``mean``/``std`` (see `normalize`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from wmdd_jax.errors import UserError


class Source(Protocol):
    """What a dataset split offers the rest of the toolkit."""

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def labels(self) -> np.ndarray: ...

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images [k, h, w, c] float32 in [0, 1], labels [k] int32."""
        ...

    def class_indices(self, k: int) -> np.ndarray: ...


@dataclasses.dataclass
class ArraySource:
    """A split held in memory (uint8 or float images) — Fashion-MNIST, synthetic sets, subsets."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "array"

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be [n, h, w, c], got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = np.asarray(self.labels, np.int32)
        self._by_class = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return to_float(self.images[indices]), self.labels[indices]

    def class_indices(self, k: int) -> np.ndarray:
        if self._by_class is None:
            self._by_class = group_by_class(self.labels, self.num_classes)
        return self._by_class[k]

    def subset(self, indices: np.ndarray, name: str | None = None) -> "ArraySource":
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices],
                                   name=name or self.name)


def group_by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """For each class, the ascending indices of its examples."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def to_float(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32, copy=False)


def _stat(v):
    return np.asarray(v, np.float32) if isinstance(v, (tuple, list)) else v


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """[0, 1] images -> model input. Works on numpy and jax arrays (and tracers) alike."""
    return (images - _stat(mean)) / _stat(std)


def denormalize(images, mean: Sequence[float], std: Sequence[float]):
    return images * _stat(std) + _stat(mean)


def load_all(source: Source, batch_size: int = 4096) -> ArraySource:
    """Reads a whole split into memory (for small sets and tests)."""
    if isinstance(source, ArraySource):
        return source
    parts = [source.get(np.arange(i, min(i + batch_size, len(source)))) for i in range(0, len(source), batch_size)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArraySource(images, labels, source.num_classes, source.mean, source.std, source.name)


def random_subset(source: Source, ipc: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``ipc`` random real images per class: ([C * ipc] indices, [C * ipc] labels), class-major."""
    rng = np.random.default_rng(seed)
    picks = []
    for k in range(source.num_classes):
        idx = source.class_indices(k)
        if len(idx) < ipc:
            raise UserError(f"class {k} of {source.name} has {len(idx)} images, fewer than ipc={ipc}; "
                            f"lower --config.ipc")
        picks.append(np.sort(rng.choice(idx, ipc, replace=False)))
    indices = np.concatenate(picks)
    return indices, np.repeat(np.arange(source.num_classes, dtype=np.int32), ipc)
