"""tensorflow-datasets splits as `Source`s, read through ``tfds.data_source`` (array_record, no TensorFlow).

``load(name, split, data_config)`` opens split ``train`` or ``test`` of a dataset
prepared (as array_record) in ``data_config.data_dir`` (empty: ``$TFDS_DATA_DIR``
or ``~/tensorflow_datasets``). Preparing cifar10, cifar100, imagenette and
imagenet2012 needs TensorFlow (their tfds builders use it), so do it once where
TensorFlow is installed and copy the folder; tiny_imagenet is prepared here
without TensorFlow by `wmdd_jax.data.tiny_imagenet.prepare_tiny_imagenet`.

Images are read as their stored JPEG/PNG bytes and decoded with PIL: any mode
(grayscale, CMYK, RGBA) becomes RGB, and the shorter side is resized to
``data_config.image_size`` (bilinear, antialiased) before a centre square crop,
the ``Resize(s); CenterCrop(s)`` of the PyTorch pipelines.

Labels are read once, without decoding images, and cached as
``wmdd_jax-labels-<split>.npy`` next to the array_record files, or under
``$XDG_CACHE_HOME/wmdd_jax/tfds_labels/`` (default ``~/.cache``) when the data
folder is read-only, since a pass over ImageNet's records takes minutes.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from wmdd_jax.data import tiny_imagenet  # noqa: F401  (registers the tiny_imagenet builder with tfds)
from wmdd_jax.data.base import group_by_class
from wmdd_jax.errors import UserError

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _tfds_build(needs: str = "") -> str:
    """Advice for datasets whose tfds builder needs TensorFlow (and the internet) to prepare."""
    return (f"where TensorFlow is installed{needs}, run 'tfds build {{tfds_name}} --data_dir=DIR "
            f"--file_format=array_record', then copy DIR/{{folder}} into {{root}}")


class DatasetSpec(NamedTuple):
    """How one of our dataset names maps onto tfds."""

    tfds_name: str  # 'builder[/config]'
    splits: dict[str, str]  # our split -> tfds split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int  # used when the config sets none
    how_to_prepare: str  # formatted with tfds_name, root (the data dir), folder (the builder's folder)


SPECS = {
    "cifar10": DatasetSpec("cifar10", {"train": "train", "test": "test"}, 10, *_CIFAR10_STATS, 32,
                           _tfds_build(" and the internet is reachable")),
    "cifar100": DatasetSpec("cifar100", {"train": "train", "test": "test"}, 100, *_CIFAR100_STATS, 32,
                            _tfds_build(" and the internet is reachable")),
    "imagenette": DatasetSpec("imagenette/full-size-v2", {"train": "train", "test": "validation"}, 10,
                              *_IMAGENET_STATS, 224, _tfds_build(" and the internet is reachable")),
    "imagenet2012": DatasetSpec("imagenet2012", {"train": "train", "test": "validation"}, 1000, *_IMAGENET_STATS,
                                224, _tfds_build(" and DIR/downloads/manual holds ILSVRC2012_img_train.tar and "
                                                 "ILSVRC2012_img_val.tar (from image-net.org)")),
    "tiny_imagenet": DatasetSpec("tiny_imagenet", {"train": "train", "test": "validation"}, 200, *_IMAGENET_STATS,
                                 64, "unzip tiny-imagenet-200.zip (cs231n.stanford.edu) and run python -c \"from "
                                     "wmdd_jax.data.tiny_imagenet import prepare_tiny_imagenet as p; "
                                     "p('PATH/tiny-imagenet-200', '{root}')\" (no TensorFlow needed)"),
}


def load(name: str, split: str, data_config) -> "TfdsSource":
    """Split ``train`` or ``test`` of dataset ``name`` (a key of `SPECS`).

    ``data_config`` fields read: ``data_dir`` (tfds data dir; empty for the tfds
    default), ``image_size`` (side of the square images returned; the dataset's
    usual size when unset) and, optionally, ``tfds_name`` (another builder
    config, e.g. ``imagenette/320px-v2``).
    """
    spec = SPECS[name]
    tfds_name = data_config.get("tfds_name") or spec.tfds_name
    data_dir = data_config.get("data_dir") or None
    records = _open(name, tfds_name, spec.splits[split], data_dir, spec)
    image_size = int(data_config.get("image_size") or spec.image_size)
    return TfdsSource(records, f"{name}/{split}", spec.num_classes, spec.mean, spec.std, image_size)


def _open(name: str, tfds_name: str, tfds_split: str, data_dir: str | None, spec: DatasetSpec):
    """The split's records, images as stored bytes; a `UserError` when the data are not there."""
    try:
        records = tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir, download=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as error:  # tfds raises KeyError, NotImplementedError... for data that are not there
        problem = _diagnose(name, tfds_name, data_dir, spec)
        if problem is None:
            raise
        raise UserError(problem) from error
    try:
        if len(records):
            records[0]
    except ModuleNotFoundError:
        # `tfds.testing.mock_data` needs TensorFlow to serve images undecoded; it can serve them decoded.
        records = tfds.data_source(tfds_name, split=tfds_split, data_dir=data_dir, download=False)
    return records


def _diagnose(name: str, tfds_name: str, data_dir: str | None, spec: DatasetSpec) -> str | None:
    """Why the dataset cannot be read, as advice, or None when it looks prepared."""
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as error:  # an unknown builder or config, e.g. from --config.data.tfds_name
        return f"tfds cannot make {tfds_name!r} ({str(error).splitlines()[0]}); check --config.data.tfds_name"
    root = data_dir or tfds.core.constants.get_default_data_dir()
    if not builder.is_prepared():
        how = spec.how_to_prepare.format(tfds_name=tfds_name, root=root, folder=builder.name)
        return (f"dataset {name} ({tfds_name}) is not prepared in {root} (set --config.data.data_dir to its tfds "
                f"data dir); to prepare it, {how}")
    formats = builder.info.available_file_formats()
    if not formats & set(tfds.core.FileFormat.with_random_access()):
        return (f"dataset {name} in {builder.data_path} is stored as {sorted(f.value for f in formats)}, which "
                f"has no random access; rebuild it with 'tfds build {tfds_name} --file_format=array_record' or "
                f"convert it with 'tfds convert_format --dataset_version_dir={builder.data_path} "
                f"--out_file_format=array_record'")
    return None


class TfdsSource:
    """One split of a tfds dataset, read by index: images resized to ``image_size`` on the fly."""

    def __init__(self, records, name: str, num_classes: int, mean, std, image_size: int):
        self.records, self.name, self.num_classes = records, name, num_classes
        self.mean, self.std, self.image_size = tuple(mean), tuple(std), image_size
        self._labels = None
        self._by_class = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    @property
    def labels(self) -> np.ndarray:
        """[n] int32, read on first use (from the cache when there is one)."""
        if self._labels is None:
            self._labels = _cached_labels(self.records)
        return self._labels

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images [k, s, s, 3] float32 in [0, 1], labels [k] int32 for ``indices`` [k]."""
        examples = [self.records[int(i)] for i in np.asarray(indices).reshape(-1)]
        images = np.zeros((len(examples), *self.image_shape), np.float32)
        for j, example in enumerate(examples):
            images[j] = fit_image(example["image"], self.image_size)
        images /= 255.0
        return images, np.asarray([example["label"] for example in examples], np.int32)

    def class_indices(self, k: int) -> np.ndarray:
        """[n_k] indices of the images of class ``k``, ascending."""
        if self._by_class is None:
            self._by_class = group_by_class(self.labels, self.num_classes)
        return self._by_class[k]


def fit_image(image: bytes | np.ndarray, size: int) -> np.ndarray:
    """An encoded (bytes) or decoded ([h, w(, c)] uint8) image as uint8 [size, size, 3].

    The shorter side goes to ``size`` (bilinear, antialiased), then the centre
    ``size`` x ``size`` square is cut, with torchvision's rounding.
    """
    if isinstance(image, np.ndarray):
        pil = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    else:
        pil = Image.open(io.BytesIO(image))
        width, height = pil.size
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly; ask for no less than the resize target.
        pil.draft("RGB", (-(-width * size // min(width, height)), -(-height * size // min(width, height))))
    pil = pil.convert("RGB")
    width, height = pil.size
    if (width, height) != (size, size):
        short = min(width, height)
        new_w, new_h = (size, int(size * height / short)) if width == short else (int(size * width / short), size)
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        pil = pil.crop((left, top, left + size, top + size))
    return np.asarray(pil, np.uint8)


def _cached_labels(records) -> np.ndarray:
    """All labels of ``records`` [n] int32, from or into the label cache."""
    paths = _label_cache_paths(records)
    for path in paths:
        if os.path.isfile(path):
            labels = np.load(path)
            if labels.shape == (len(records),):
                return labels.astype(np.int32, copy=False)
    labels = np.fromiter((example["label"] for example in records), np.int32, count=len(records))
    for path in paths:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            np.save(tmp, labels)
            os.replace(tmp, path)
            break
        except OSError:  # read-only data dir: try the user cache
            continue
    return labels


def _label_cache_paths(records) -> list[str]:
    """Where the labels of ``records`` may be cached: next to the data, then in the user cache.

    Empty when the records have no folder on disk (as under `tfds.testing.mock_data`).
    """
    info = records.dataset_info
    data_path = os.fspath(info.data_dir)
    if not os.path.isdir(data_path):
        return []
    file_name = f"wmdd_jax-labels-{records.split}.npy"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # One cache folder per data folder: two copies of a dataset may differ.
    digest = hashlib.sha1(os.path.abspath(data_path).encode()).hexdigest()[:12]
    folder = f"{info.full_name.replace('/', '-')}-{digest}"
    return [os.path.join(data_path, file_name), os.path.join(cache, "wmdd_jax", "tfds_labels", folder, file_name)]
