"""Fashion-MNIST from its idx files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from wmdd_jax.data.base import ArraySource
from wmdd_jax.errors import UserError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = (0.2860,), (0.3530,)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> np.ndarray:
    """Reads an idx file (optionally gzipped) into a uint8 array of its stated shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"{path} is not a uint8 idx file; re-install the dataset files")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({array.size} of {int(np.prod(shape))} values); re-install it")
    return array.reshape(shape)


def _find(data_dir: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def load_fashion_mnist(split: str, data_dir: str = "") -> ArraySource:
    """Loads the ``train`` or ``test`` split as uint8 [n, 28, 28, 1] images."""
    # An explicit folder is the only place looked at; else $WMDD_FASHION_MNIST_DIR, then Debian's.
    dirs = [data_dir] if data_dir else [d for d in (os.environ.get("WMDD_FASHION_MNIST_DIR", ""), DEBIAN_DIR) if d]
    for d in dirs:
        paths = [_find(d, stem) for stem in _FILES[split]]
        if all(paths):
            images = read_idx(paths[0])[..., None]
            labels = read_idx(paths[1]).astype(np.int32)
            return ArraySource(images, labels, 10, MEAN, STD, name=f"fashion_mnist/{split}")
    raise UserError(
        f"Fashion-MNIST idx files not found in {', '.join(dirs)}: install them with "
        f"'apt-get install dataset-fashion-mnist' (or 'make setup'), or point --config.data.data_dir "
        f"at a folder holding {_FILES[split][0]}.gz and {_FILES[split][1]}.gz")
