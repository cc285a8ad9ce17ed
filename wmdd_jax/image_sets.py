"""Image sets and their stored soft labels on disk: what ``recover`` writes and ``relabel`` and
``evaluate`` read.

An image set is ``images.npz`` (``images [n, h, w, c]`` in [0, 1], ``labels [n]``, optional
``weights [n]`` and ``method``), or a PyTorch set (class folders or a ``.pt`` file, see
`wmdd_jax.interop.images`). Its stored soft labels are ``soft_labels.npz`` beside it
(``logits [steps, batch, classes]`` float16 and the recipe they were made for).
"""

from __future__ import annotations

import json
import os

import numpy as np

from wmdd_jax import checkpoint as ckpt
from wmdd_jax import interop
from wmdd_jax.data import ArraySource, Source
from wmdd_jax.errors import UserError
from wmdd_jax.fingerprint import fingerprint
from wmdd_jax.train_step import batch_plan

SYNTHETIC_FILE = "images.npz"
SOFT_LABELS_FILE = "soft_labels.npz"


def load_image_set(path: str, like: Source) -> tuple[ArraySource, np.ndarray, str]:
    """A saved set: ``images`` [n, h, w, c] in [0, 1], ``labels`` [n], optional ``weights`` [n], ``method``."""
    file = path if path.endswith(".npz") else os.path.join(path, SYNTHETIC_FILE)
    if not os.path.exists(file) and interop.is_torch_image_set(path):  # class folders or a .pt file
        return interop.load_torch_image_set(path, like)
    if not os.path.exists(file):
        raise UserError(_no_image_set(path, file))
    z = ckpt.read_npz(file, "recover")
    if "images" not in z or "labels" not in z:
        raise UserError(f"{file} holds {sorted(z)}, not an image set ('images' [n, h, w, c] in [0, 1] and "
                        f"'labels' [n])")
    images, labels = z["images"].astype(np.float32), z["labels"].astype(np.int32)
    weights = z["weights"].astype(np.float32) if "weights" in z else np.ones(len(labels), np.float32)
    method = str(z["method"]) if "method" in z else "synthetic"
    if images.ndim != 4 or len(images) != len(labels):
        raise UserError(f"{file} holds images of shape {images.shape} and labels of shape {labels.shape}; "
                        f"expected [n, h, w, c] and [n]")
    if tuple(images.shape[1:]) != tuple(like.image_shape):
        raise UserError(f"images in {file} are {images.shape[1:]}, the dataset's are {like.image_shape}")
    return ArraySource(images, labels, like.num_classes, like.mean, like.std, name=file), weights, method


def _no_image_set(path: str, file: str) -> str:
    """What to say when ``path`` holds no image set we can read."""
    if not os.path.exists(path):
        if path.rstrip("/").endswith("synthetic"):
            return f"no image set at {file}: run the distillation stages first, or pass --config.eval.source=random_real"
        return f"--config.eval.source={path} does not exist: pass a folder holding images.npz, new000/ class folders or a .pt file"
    if os.path.isdir(path):
        folders = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
        if folders:
            return (f"{path} holds folders {', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''} but no image "
                    f"set: class folders must be named new000, new001, ... (the SRe2L/WMDD layout), or give "
                    f"an images.npz or a .pt file")
    return f"no image set at {file}: {path} holds no images.npz, new000/ class folders or .pt file"


def images_per_class(labels: np.ndarray, num_classes: int, where: str) -> int | None:
    """The set's IPC: its images per class when every class has the same count, else None.

    A set that lacks a class entirely (or has labels outside the dataset's classes) is refused.
    """
    labels = np.asarray(labels)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise UserError(f"{where} has labels {sorted(set(outside.tolist()))[:5]} outside the dataset's "
                        f"{num_classes} classes [0, {num_classes})")
    counts = np.bincount(labels, minlength=num_classes)
    if not counts.all():
        raise UserError(f"{where} has no images of classes {np.flatnonzero(counts == 0).tolist()} (of "
                        f"{num_classes}): a student trained on it could never predict them; complete the set")
    return int(counts[0]) if np.all(counts == counts[0]) else None


def augment_recipe(spec) -> str:
    """The augmentation the stored labels were made under, as canonical JSON."""
    return json.dumps(spec.augment.to_dict(), sort_keys=True)


def image_set_id(data, weights) -> str:
    """The fingerprint of an image set: its images, labels and per-image loss weights."""
    return fingerprint({"images": data.images, "labels": data.labels, "weights": weights})


def load_soft_labels(folder: str, spec, num_images: int, made_by: dict[str, str]) -> tuple[np.ndarray, int]:
    """(logits, data_seed) stored for ``spec``; a clear error when absent or made for another recipe.

    ``made_by``: ``{"teacher": ..., "images": ...}`` fingerprints the labels must have been made
    from (`wmdd_jax.teacher.identity`, `image_set_id`).
    """
    path = os.path.join(folder, SOFT_LABELS_FILE)
    if not os.path.exists(path):
        raise UserError(f"no stored soft labels at {path}: run the 'relabel' stage, or set "
                        f"--config.eval.soft.relabel=online")
    z = ckpt.read_npz(path, "relabel")
    logits, seed = z["logits"], int(z["data_seed"])
    made_for = (int(z["epochs"]), int(z["num_images"]), int(z["batch_size"]) if "batch_size" in z else logits.shape[1])
    augment = str(z["augment"]) if "augment" in z else None
    stored_by = {key: str(z[key]) if key in z else "unrecorded" for key in made_by}
    wanted = (int(spec.epochs), num_images, batch_plan(num_images, spec)[0])
    if made_for != wanted:
        raise UserError(f"{path} was made for {made_for[0]} epochs over {made_for[1]} images in batches of "
                        f"{made_for[2]}, the recipe is {wanted[0]} epochs over {wanted[1]} in batches of "
                        f"{wanted[2]}: delete it and rerun 'relabel'")
    if augment is not None and augment != augment_recipe(spec):
        raise UserError(f"{path} was made under augmentation {augment}, the recipe's is "
                        f"{augment_recipe(spec)}: delete it and rerun 'relabel'")
    for key, want in made_by.items():
        if stored_by[key] != want:
            raise UserError(f"{path} was made from another {'teacher' if key == 'teacher' else 'image set'} "
                            f"({key} {stored_by[key]} there, {want} now): delete it and rerun 'relabel'")
    return logits, seed
