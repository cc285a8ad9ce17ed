"""Fashion-MNIST from its idx files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib

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
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut-off file: EOFError
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}); it is damaged or cut off: "
                        f"re-install the dataset files ('make data')") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or len(data) < 4 + 4 * data[3]:
        raise UserError(f"{path} is not a uint8 idx file; re-install the dataset files ('make data')")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated ({array.size} of {int(np.prod(shape))} values); re-install it "
                        f"('make data')")
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
            images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int32)
            if images.ndim != 3 or labels.ndim != 1:
                raise UserError(f"{paths[0]} must hold [n, h, w] images and {paths[1]} [n] labels, got shapes "
                                f"{images.shape} and {labels.shape}; re-install the dataset files")
            if len(images) != len(labels):
                raise UserError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels: "
                                f"the two files do not belong together; re-install the dataset files")
            return ArraySource(images[..., None], labels, 10, MEAN, STD, name=f"fashion_mnist/{split}")
    raise UserError(
        f"Fashion-MNIST idx files not found in {', '.join(dirs)}: install them with "
        f"'make data' (apt-get install dataset-fashion-mnist), or point --config.data.data_dir "
        f"at a folder holding {_FILES[split][0]}.gz and {_FILES[split][1]}.gz")
