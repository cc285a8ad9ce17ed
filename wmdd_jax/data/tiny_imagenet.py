"""A tensorflow-datasets builder for Tiny-ImageNet (tfds has none).

It reads the standard ``tiny-imagenet-200`` folder (the unpacked
``tiny-imagenet-200.zip`` of http://cs231n.stanford.edu/tiny-imagenet-200.zip)::

    tiny-imagenet-200/
      wnids.txt                      the 200 class ids (WordNet ids), one a line
      words.txt                      "<wnid>\\t<words>" for all of WordNet
      train/<wnid>/images/*.JPEG     500 images per class
      val/images/*.JPEG              10,000 images
      val/val_annotations.txt        "<file>\\t<wnid>\\t<bbox...>"

and writes splits ``train`` (100,000) and ``validation`` (10,000) of 64x64x3 JPEG
images and labels as array_record, which ``tfds.data_source`` reads without
TensorFlow. The unlabelled ``test`` folder is skipped.

Labels are the positions of the wnids in *sorted* order, the order of
``torchvision.datasets.ImageFolder`` on ``train/``, so labels agree with models
trained by the PyTorch pipelines. ``info.metadata`` holds ``wnids`` (label ->
wnid) and ``words`` (wnid -> description).

Preparation needs no TensorFlow: JPEG files are stored as they are (the few
grayscale or CMYK ones are re-encoded as RGB JPEG with PIL), and the example
serialiser and array_record writer of tfds are pure Python/C++. Use
`prepare_tiny_imagenet`.
"""

from __future__ import annotations

import io
import os

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from wmdd_jax.errors import UserError

NUM_CLASSES = 200
IMAGE_SIZE = 64
FOLDER = "tiny-imagenet-200"


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet: 200 ImageNet classes at 64x64, 500 train and 50 validation images each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Train and validation splits from the tiny-imagenet-200 folder."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it in the manual dir, "
        "so that <manual_dir>/tiny-imagenet-200/wnids.txt exists (or point the manual dir at the "
        "tiny-imagenet-200 folder itself).")
    # tfds finds this file through `importlib_resources`, a package it does not install; naming the file
    # here spares that import.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://cs231n.stanford.edu/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = find_root(os.fspath(dl_manager.manual_dir))
        wnids = read_wnids(root)
        self.info.metadata["wnids"] = wnids
        self.info.metadata["words"] = read_words(root, wnids)
        label_of = {wnid: i for i, wnid in enumerate(wnids)}
        train = []
        for wnid in wnids:
            folder = os.path.join(root, "train", wnid, "images")
            train += [(os.path.join(folder, f), label_of[wnid]) for f in sorted(os.listdir(folder))
                      if f.lower().endswith((".jpeg", ".jpg"))]
        val = []
        with open(os.path.join(root, "val", "val_annotations.txt")) as f:
            for line in f:
                if line.strip():
                    file_name, wnid = line.split("\t")[:2]
                    val.append((os.path.join(root, "val", "images", file_name), label_of[wnid]))
        return {"train": self._generate_examples(train), "validation": self._generate_examples(sorted(val))}

    def _generate_examples(self, files):
        for path, label in files:
            name = os.path.basename(path)
            yield name, {"image": rgb_jpeg_bytes(path), "label": label, "file_name": name}


def find_root(manual_dir: str) -> str:
    """The ``tiny-imagenet-200`` folder: ``manual_dir`` itself or its child of that name."""
    for root in (manual_dir, os.path.join(manual_dir, FOLDER)):
        if os.path.isfile(os.path.join(root, "wnids.txt")):
            return root
    raise UserError(f"no {FOLDER}/wnids.txt under {manual_dir}: "
                    f"{TinyImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS}")


def read_wnids(root: str) -> list[str]:
    with open(os.path.join(root, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    if not 0 < len(wnids) <= NUM_CLASSES or len(set(wnids)) != len(wnids):
        raise UserError(f"{root}/wnids.txt should list up to {NUM_CLASSES} distinct wnids, found {len(wnids)}")
    return wnids


def read_words(root: str, wnids: list[str]) -> dict[str, str]:
    path = os.path.join(root, "words.txt")
    words = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                wnid, _, text = line.rstrip("\n").partition("\t")
                words[wnid] = text
    return {wnid: words.get(wnid, wnid) for wnid in wnids}


def rgb_jpeg_bytes(path: str) -> bytes:
    """The file's bytes when it is an RGB JPEG, else the image re-encoded as RGB JPEG.

    The feature declares 3 channels; a few Tiny-ImageNet files are grayscale.
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        if image.format == "JPEG" and image.mode == "RGB":
            return data
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=95)
        return out.getvalue()


def prepare_tiny_imagenet(manual_dir: str, data_dir: str) -> str:
    """Writes Tiny-ImageNet as array_record under ``data_dir/tiny_imagenet/1.0.0``.

    Args:
      manual_dir: the ``tiny-imagenet-200`` folder, or a folder holding it.
      data_dir: the tfds data dir that ``--config.data.data_dir`` will name.

    Returns:
      The folder written. Takes about a minute per 10^5 images; no TensorFlow needed.
    """
    find_root(manual_dir)  # a clear error before tfds creates any folder
    builder = TinyImagenet(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False))
    return os.fspath(builder.data_path)
