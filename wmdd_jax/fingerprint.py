"""Content fingerprints: what a run learned from, recorded in its ``recipe.json``."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def fingerprint(tree: Any) -> str:
    """SHA-256 (16 hex digits) of a pytree of arrays: every leaf's path, dtype, shape and bytes.

    Two trees share it only if they hold the same arrays under the same names (to hash
    collisions), whatever device they are on or the order their dict keys were inserted in.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
