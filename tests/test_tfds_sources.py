"""tfds-backed sources: mocked cifar10/imagenette, a Tiny-ImageNet built from a fake folder, errors."""

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict
from PIL import Image

from wmdd_jax.data import load_split
from wmdd_jax.data.tfds_sources import fit_image
from wmdd_jax.data.tiny_imagenet import prepare_tiny_imagenet
from wmdd_jax.errors import UserError


def data_config(name, image_size, data_dir=""):
    return ConfigDict(dict(name=name, data_dir=data_dir, image_size=image_size, validation_per_class=0))


def check_source(source, size, num_classes):
    """Shapes, dtypes, ranges, and agreement of get / labels / class_indices."""
    n = len(source)
    assert source.image_shape == (size, size, 3)
    labels = source.labels
    assert labels.dtype == np.int32 and labels.shape == (n,)
    assert labels.min() >= 0 and labels.max() < num_classes
    picks = np.array([n - 1, 0, n // 2])
    images, got = source.get(picks)
    assert images.dtype == np.float32 and images.shape == (3, size, size, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() > 0.0
    np.testing.assert_array_equal(got, labels[picks])
    parts = [source.class_indices(k) for k in range(num_classes)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    for k, part in enumerate(parts):
        assert np.all(labels[part] == k)


@pytest.mark.parametrize("name,size,num_classes,mean", [
    ("cifar10", 32, 10, (0.4914, 0.4822, 0.4465)),
    ("imagenette", 40, 10, (0.485, 0.456, 0.406)),  # mocked images have random shapes: resized + cropped
])
def test_mocked_tfds_sets(name, size, num_classes, mean):
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        for split in ("train", "test"):
            source = load_split(data_config(name, size), split)
            assert len(source) == 30 and source.num_classes == num_classes
            assert source.mean == mean and source.name == f"{name}/{split}"
            check_source(source, size, num_classes)


def three_bands(width, height, mode="RGB"):
    """Left, centre and right thirds red, green and blue: after fitting, the centre square is green."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 3, 0] = image[:, width // 3 : 2 * width // 3, 1] = image[:, 2 * width // 3 :, 2] = 255
    return Image.fromarray(image).convert(mode)


def encode(image, fmt):
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("image,size", [
    (np.asarray(three_bands(96, 32)), 32),  # decoded, no resize needed across the short side
    (np.asarray(three_bands(300, 100)), 20),  # decoded, downscaled
    (encode(three_bands(600, 200), "JPEG"), 24),  # JPEG decoded at reduced scale (draft)
    (encode(three_bands(150, 50, "RGBA"), "PNG"), 50),
])
def test_fit_image_keeps_the_centre(image, size):
    out = fit_image(image, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    inner = out[:, 2:-2].astype(float)  # one resampled pixel may blend at the band edges
    np.testing.assert_allclose(inner.mean((0, 1)), [0, 255, 0], atol=12)


@pytest.mark.parametrize("image", [
    np.full((10, 20), 128, np.uint8), np.full((10, 20, 1), 128, np.uint8),
    encode(Image.new("L", (20, 10), 128), "JPEG"), encode(Image.new("CMYK", (20, 10), (0, 0, 0, 127)), "JPEG"),
])
def test_fit_image_makes_rgb(image):
    out = fit_image(image, 8)
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out, 128, atol=3)


WNIDS = ("n02", "n01", "n03")  # wnids.txt order; labels follow the sorted order n01, n02, n03
COLOURS = {"n01": (255, 0, 0), "n02": (0, 255, 0), "n03": (0, 0, 255)}


def write_fake_tiny_imagenet(root):
    """3 classes, 3 train images each (one grayscale), 4 validation images; class = colour."""
    os.makedirs(root / "val" / "images")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish\nn02\ttabby cat\nn03\tfire engine\nn99\tunused\n")
    for wnid in WNIDS:
        os.makedirs(root / "train" / wnid / "images")
        for i in range(3):
            Image.new("RGB", (64, 64), COLOURS[wnid]).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    Image.new("L", (64, 64), 200).save(root / "train" / "n02" / "images" / "n02_gray.JPEG")
    lines = []
    for i, wnid in enumerate(("n03", "n01", "n02", "n03")):
        Image.new("RGB", (64, 64), COLOURS[wnid]).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_builds_and_reads_back(tmp_path):
    write_fake_tiny_imagenet(tmp_path / "manual" / "tiny-imagenet-200")
    written = prepare_tiny_imagenet(str(tmp_path / "manual"), str(tmp_path / "tfds"))
    assert os.path.isfile(os.path.join(written, "dataset_info.json"))

    for split, n, size in (("train", 10, 64), ("test", 4, 32)):
        source = load_split(data_config("tiny_imagenet", size, str(tmp_path / "tfds")), split)
        assert len(source) == n and source.num_classes == 200
        check_source(source, size, 200)
        images, labels = source.get(np.arange(n))
        colours = np.array([COLOURS[w] for w in sorted(WNIDS)] + [(200, 200, 200)]) / 255.0
        means = images.mean((1, 2))  # [n, 3]
        nearest = np.argmin(((means[:, None] - colours[None]) ** 2).sum(-1), axis=1)
        gray = nearest == 3
        assert gray.sum() == (split == "train")  # the grayscale file came back as 3 equal channels
        np.testing.assert_array_equal(nearest[~gray], labels[~gray])  # image and label stay paired
        np.testing.assert_array_equal(labels[gray], 1)  # n02 is label 1 (sorted wnids)
        np.testing.assert_allclose(means[~gray], colours[labels[~gray]], atol=0.03)

    # Labels are cached next to the data and read from there the next time.
    cached = os.path.join(written, "wmdd_jax-labels-train.npy")
    assert os.path.isfile(cached)
    np.testing.assert_array_equal(np.load(cached),
                                  load_split(data_config("tiny_imagenet", 64, str(tmp_path / "tfds")), "train").labels)
    info = tfds.builder("tiny_imagenet", data_dir=str(tmp_path / "tfds")).info
    assert info.metadata["wnids"] == ["n01", "n02", "n03"] and info.metadata["words"]["n01"] == "goldfish"


@pytest.mark.parametrize("name,advice", [
    ("cifar10", "tfds build cifar10 --data_dir=DIR --file_format=array_record"),
    ("imagenet2012", "ILSVRC2012_img_train.tar"),
    ("tiny_imagenet", "prepare_tiny_imagenet"),
])
def test_missing_dataset_says_how_to_prepare(tmp_path, name, advice):
    with pytest.raises(UserError) as error:
        load_split(data_config(name, 32, str(tmp_path)), "train")
    message = str(error.value)
    assert "not prepared" in message and str(tmp_path) in message and advice in message
    assert "\n" not in message


def test_bad_tfds_name_and_manual_dir_are_user_errors(tmp_path):
    config = data_config("imagenette", 32, str(tmp_path))
    config.tfds_name = "imagenette/no-such-config"
    with pytest.raises(UserError, match="tfds_name"):
        load_split(config, "train")
    with pytest.raises(UserError, match="tiny-imagenet-200.zip"):
        prepare_tiny_imagenet(str(tmp_path / "empty"), str(tmp_path / "tfds"))
