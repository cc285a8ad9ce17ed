"""Synthetic image sets in the PyTorch code's layouts, in and out.

Image folder (SRe2L, WMDD, RDED: what their recover step writes)::

    FOLDER/new000/class000_id000.jpg
    FOLDER/new000/class000_id001.jpg
    FOLDER/new001/class001_id000.jpg ...

one subfolder ``new{class:03d}`` per class, PNG or JPEG files of denormalised pixels
(``uint8 = x * 255``); read back as ``uint8 / 255``, labels from the folder name, images of a
class in the order of their ``_id{i}`` (else their name). A ``wmdd_meta.json`` beside the
class folders, written by `write_image_folder`, carries what the layout cannot: the
``method`` name and per-image barycenter ``weights``. PyTorch reads the folder with
``torchvision.datasets.ImageFolder`` (classes sorted by name: ``new000`` is class 0 when
every class has a folder).

Tensor file (``.pt``): images ``[n, c, h, w]`` float, *normalised* with the dataset's
mean/std as the PyTorch models see them, and labels ``[n]`` int (``[n, classes]`` soft
labels are reduced to their argmax). Accepted contents:

- a dict with ``images`` (or ``image_syn``) and ``labels`` (or ``label_syn``), optional
  ``weights`` [n], ``mean`` and ``std`` [c] (override the dataset's normalisation), ``method``;
- DC/DM's result file ``{'data': [[images, labels], ...], ...}``: the first experiment;
- a pair ``(images, labels)``;
- an images tensor alone, with its labels in a sibling file whose name has ``labels`` in
  place of ``images`` (MTT's ``images_best.pt`` / ``labels_best.pt``).
A folder holding one such file (or one ``images*.pt``) may be given instead of the file.
Imported tensors are denormalised but not clipped, so students see exactly the pixels the
PyTorch evaluation saw. ZCA-whitened sets (MTT on CIFAR) cannot be inverted and are not supported.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple, Sequence

import numpy as np

from wmdd_jax import files
from wmdd_jax.data import ArraySource
from wmdd_jax.errors import UserError
from wmdd_jax.interop.checkpoint import import_torch, to_numpy, torch_load

META_FILE = "wmdd_meta.json"
DEFAULT_METHOD = "pytorch"
_CLASS_DIR = re.compile(r"new(\d+)")
_IMAGE_ID = re.compile(r"_id(\d+)\.[^.]+$")
_IMAGE_EXT = (".png", ".jpg", ".jpeg")
_FORMATS = {"png": ("png", "PNG"), "jpeg": ("jpg", "JPEG"), "jpg": ("jpg", "JPEG")}


class ImageSet(NamedTuple):
    """images: [n, h, w, c] float32 in [0, 1]; labels: [n] int32; weights: [n] float32; method: name."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    method: str


# --------------------------------------------------------------------------- detection


def _class_dirs(folder: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(folder):
        m = _CLASS_DIR.fullmatch(name)
        if m and os.path.isdir(os.path.join(folder, name)):
            out.append((int(m[1]), name))
    return sorted(out)


def _tensor_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".pt") and not f.startswith("labels"))


def is_torch_image_set(path: str) -> bool:
    """Whether ``path`` is a ``.pt`` file, or a folder with ``new***`` class folders or ``.pt`` files."""
    if os.path.isfile(path):
        return path.endswith((".pt", ".pth"))
    return os.path.isdir(path) and bool(_class_dirs(path) or _tensor_files(path))


# --------------------------------------------------------------------------- image folders


def _image_files(folder: str) -> list[str]:
    names = [f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXT)]
    key = lambda f: (0, int(_IMAGE_ID.search(f)[1]), f) if _IMAGE_ID.search(f) else (1, 0, f)  # noqa: E731
    return sorted(names, key=key)


def read_image_folder(folder: str, channels: int | None = None) -> ImageSet:
    """Reads the ``new{class:03d}/`` layout (see the module docstring).

    Args:
      folder: the folder holding the class folders.
      channels: 1 or 3 to convert every image to grayscale or RGB (PIL's conversion, exact
        for gray images saved as RGB); None keeps grayscale and RGB files as they are.
    """
    from PIL import Image

    classes = _class_dirs(folder)
    if not classes:
        raise UserError(f"no class folders new000/, new001/, ... in {folder}")
    images, labels, names = [], [], []
    for k, name in classes:
        for f in _image_files(os.path.join(folder, name)):
            file = os.path.join(folder, name, f)
            try:
                with Image.open(file) as im:
                    mode = {1: "L", 3: "RGB"}.get(channels) or (im.mode if im.mode in ("L", "RGB") else "RGB")
                    a = np.asarray(im.convert(mode) if im.mode != mode else im, np.uint8)
            except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data
                raise UserError(f"{file} is not a readable image ({type(e).__name__}: {str(e)[:120]}): "
                                f"replace or delete it") from e
            images.append(a[..., None] if a.ndim == 2 else a)
            labels.append(k)
            names.append(f"{name}/{f}")
    if not images:
        raise UserError(f"the class folders in {folder} hold no .png or .jpg images")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise UserError(f"images in {folder} differ in shape ({sorted(shapes)[:3]}): resize them to one size")
    weights, method = np.ones(len(images), np.float32), DEFAULT_METHOD
    meta_path = os.path.join(folder, META_FILE)
    if os.path.exists(meta_path):
        meta = files.read_json(meta_path, default={}, what="the set's method and weights")
        method = meta.get("method", method)
        stored = meta.get("weights", {})
        weights = np.array([stored.get(n, 1.0) for n in names], np.float32)
    pixels = np.stack(images).astype(np.float32) / 255.0
    return ImageSet(pixels, np.array(labels, np.int32), weights, method)


def write_image_folder(folder: str, images: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
                       method: str | None = None, image_format: str = "png", quality: int = 95) -> list[str]:
    """Writes ``images`` [n, h, w, c] in [0, 1] as ``folder/new{k:03d}/class{k:03d}_id{i:03d}.png``.

    Pixels are rounded to uint8 (clipped to [0, 1] first); PNG keeps them exactly, JPEG
    (``image_format="jpeg"``, ``quality``) is the official code's choice and is lossy. ``i``
    counts the images of class ``k`` in their order in ``images``. ``weights`` and ``method``
    go to ``wmdd_meta.json``. Returns the written paths, relative to ``folder``.
    """
    from PIL import Image

    if image_format not in _FORMATS:
        raise UserError(f"image format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    ext, pil_format = _FORMATS[image_format]
    if os.path.isdir(folder) and _class_dirs(folder):
        raise UserError(f"{folder} already holds class folders; write into a new folder")
    pixels = np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    labels = np.asarray(labels).astype(np.int64)
    counts: dict[int, int] = {}
    names = []
    for a, k in zip(pixels, labels):
        i = counts.get(int(k), 0)
        counts[int(k)] = i + 1
        sub = f"new{k:03d}"
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        name = f"{sub}/class{k:03d}_id{i:03d}.{ext}"
        options = {"quality": quality} if pil_format == "JPEG" else {}
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(os.path.join(folder, name), pil_format, **options)
        names.append(name)
    meta = {"method": method or DEFAULT_METHOD}
    if weights is not None:
        meta["weights"] = {n: float(w) for n, w in zip(names, np.asarray(weights, np.float64))}
    files.write_json(os.path.join(folder, META_FILE), meta, indent=0)
    return names


# --------------------------------------------------------------------------- tensor files


def _find_tensor_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    files = _tensor_files(path)
    if len(files) != 1:
        raise UserError(f"{path} holds {len(files)} candidate .pt files ({', '.join(files[:5])}): pass the one "
                        f"to read as --config.eval.source")
    return os.path.join(path, files[0])


def _labels_beside(path: str) -> str:
    folder, name = os.path.split(path)
    if "images" not in name:
        raise UserError(f"{path} holds an images tensor alone and its name has no 'images' to find the "
                        f"labels file by (MTT layout: images_best.pt beside labels_best.pt)")
    sibling = os.path.join(folder, name.replace("images", "labels", 1))
    if not os.path.isfile(sibling):
        raise UserError(f"{path} holds an images tensor alone; its labels file {sibling} is missing")
    return sibling


def _first(d, keys):
    return next((d[k] for k in keys if k in d), None)


def read_tensor_file(path: str, mean: Sequence[float], std: Sequence[float]) -> ImageSet:
    """Reads a ``.pt`` image set (layouts in the module docstring), denormalised with ``mean``/``std``."""
    path = _find_tensor_file(path)
    obj = torch_load(path)
    weights, method = None, DEFAULT_METHOD
    if isinstance(obj, dict) and isinstance(obj.get("data"), (list, tuple)) and obj["data"]:
        obj = obj["data"][0]  # DC/DM: one [images, labels] pair per experiment
    if isinstance(obj, dict):
        images, labels = _first(obj, ("images", "image_syn")), _first(obj, ("labels", "label_syn"))
        weights = obj.get("weights")
        mean, std = obj.get("mean", mean), obj.get("std", std)
        method = str(obj.get("method", method))
        if images is None or labels is None:
            raise UserError(f"{path} is a dict with keys {sorted(obj)[:8]}; expected 'images' and 'labels' "
                            f"(or 'image_syn'/'label_syn', or DC/DM's 'data')")
    elif isinstance(obj, (list, tuple)) and len(obj) == 2:
        images, labels = obj
    elif hasattr(obj, "detach"):
        images, labels = obj, torch_load(_labels_beside(path))
    else:
        raise UserError(f"{path} holds a {type(obj).__name__}; expected images and labels tensors")
    images, labels = to_numpy(images), to_numpy(labels)
    if images.ndim != 4:
        raise UserError(f"images in {path} have shape {list(images.shape)}; expected [n, channels, h, w]")
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    if len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} images but {len(labels)} labels")
    mean = np.asarray(to_numpy(mean) if hasattr(mean, "detach") else mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(to_numpy(std) if hasattr(std, "detach") else std, np.float32).reshape(1, -1, 1, 1)
    if mean.shape[1] != images.shape[1]:
        raise UserError(f"images in {path} have {images.shape[1]} channels, the normalisation {mean.shape[1]}")
    pixels = (images.astype(np.float32) * std + mean).transpose(0, 2, 3, 1)
    weights = np.ones(len(labels), np.float32) if weights is None else to_numpy(weights).astype(np.float32)
    return ImageSet(np.ascontiguousarray(pixels), labels.astype(np.int32), weights, method)


def write_tensor_file(path: str, images: np.ndarray, labels: np.ndarray, mean: Sequence[float],
                      std: Sequence[float], weights: np.ndarray | None = None, method: str | None = None) -> None:
    """Writes ``{'images': [n, c, h, w] normalised float32, 'labels': [n] int64, 'mean', 'std', ...}``."""
    torch = import_torch()
    m = np.asarray(mean, np.float32).reshape(1, 1, 1, -1)
    s = np.asarray(std, np.float32).reshape(1, 1, 1, -1)
    normalised = ((np.asarray(images, np.float32) - m) / s).transpose(0, 3, 1, 2)
    obj = {"images": torch.from_numpy(np.ascontiguousarray(normalised)),
           "labels": torch.from_numpy(np.asarray(labels).astype(np.int64)),
           "mean": torch.from_numpy(m.reshape(-1)), "std": torch.from_numpy(s.reshape(-1)),
           "method": method or DEFAULT_METHOD}
    if weights is not None:
        obj["weights"] = torch.from_numpy(np.asarray(weights, np.float32))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path)


# --------------------------------------------------------------------------- for evaluate


def read_torch_image_set(path: str, like) -> ImageSet:
    """The set at ``path`` (class folders or a ``.pt`` file), for a dataset like the source ``like``."""
    if os.path.isdir(path) and _class_dirs(path):
        s = read_image_folder(path, channels=like.image_shape[-1])
    else:
        s = read_tensor_file(path, like.mean, like.std)
    if tuple(s.images.shape[1:]) != tuple(like.image_shape):
        raise UserError(f"images in {path} are {tuple(s.images.shape[1:])}, the dataset's are "
                        f"{tuple(like.image_shape)}")
    if s.labels.min() < 0 or s.labels.max() >= like.num_classes:
        raise UserError(f"labels in {path} span {s.labels.min()}..{s.labels.max()}, the dataset has "
                        f"{like.num_classes} classes")
    return s


def load_torch_image_set(path: str, like):
    """What `wmdd_jax.image_sets.load_image_set` returns, for a PyTorch set: (ArraySource, weights, method)."""
    s = read_torch_image_set(path, like)
    return ArraySource(s.images, s.labels, like.num_classes, like.mean, like.std, name=path), s.weights, s.method
