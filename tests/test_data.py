"""Data: the Fashion-MNIST source, splits, per-class access, jax-side augmentation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wmdd_jax.data import augment, load_split, random_subset
from wmdd_jax.data.fashion_mnist import load_fashion_mnist
from wmdd_jax.errors import UserError


def data_config(data_dir, **kw):
    fields = dict(name="fashion_mnist", data_dir=data_dir, image_size=28, validation_per_class=0, validation_seed=0)
    return ml_collections.ConfigDict({**fields, **kw})


def test_fashion_mnist_subset_reads(fmnist_dir):
    train = load_split(data_config(fmnist_dir), "train")
    assert len(train) == 400 and train.image_shape == (28, 28, 1)
    images, labels = train.get(np.arange(5))
    assert images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1 and images.max() > 0.5
    for k in range(10):
        idx = train.class_indices(k)
        assert len(idx) == 40 and np.all(train.labels[idx] == k)


def test_validation_split_is_held_out_of_train(fmnist_dir):
    cfg = data_config(fmnist_dir, validation_per_class=5)
    train, val = load_split(cfg, "train"), load_split(cfg, "validation")
    assert len(val) == 50 and len(train) == 350
    assert not set(train.indices) & set(val.indices)
    assert all(len(val.class_indices(k)) == 5 for k in range(10))


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"'make data' \(apt-get install dataset-fashion-mnist\)"):
        load_fashion_mnist("train", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="unknown dataset"):
        load_split(ml_collections.ConfigDict(dict(name="mnist3d")), "train")


def _damaged_copy(src, dst, name, change):
    """A copy of the idx folder ``src`` in ``dst`` with file ``name``'s bytes replaced by ``change(bytes)``."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / name
    path.write_bytes(change(path.read_bytes()))
    return str(dst)


def _labels_gz(labels):
    import gzip
    import struct

    return gzip.compress(struct.pack(">HBBI", 0, 8, 1, len(labels)) + bytes(labels))


@pytest.mark.parametrize("name,change,message", [
    # A label of 200 in a 10-class set: before, it trained on (and reported) garbage.
    ("train-labels-idx1-ubyte.gz", lambda b: _labels_gz([200] + [k % 10 for k in range(399)]),
     r"1 labels outside \[0, 10\) \(e.g. \[200\]\)"),
    ("train-labels-idx1-ubyte.gz", lambda b: _labels_gz([k % 10 for k in range(390)]),
     "holds 400 images but .* 390 labels: the two files do not belong together"),
    ("train-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2], "damaged or cut off: re-install"),
    ("train-images-idx3-ubyte.gz", lambda b: b"not a gzip file at all", "damaged or cut off"),
    ("train-images-idx3-ubyte.gz", lambda b: __import__("gzip").compress(b"\x00\x00\x0d\x03"),
     "is not a uint8 idx file"),
])
def test_damaged_dataset_files_are_one_clear_error(fmnist_dir, tmp_path, name, change, message):
    import pathlib

    folder = _damaged_copy(pathlib.Path(fmnist_dir), tmp_path / "fm", name, change)
    with pytest.raises(UserError, match=message):
        load_split(data_config(folder), "train")


def test_a_validation_split_larger_than_a_class_is_refused(fmnist_dir):
    with pytest.raises(UserError, match="validation_per_class=40 leaves no training images"):
        load_split(data_config(fmnist_dir, validation_per_class=40), "train")


def test_random_subset_per_class(fmnist_dir):
    train = load_split(data_config(fmnist_dir), "train")
    idx, labels = random_subset(train, 3, seed=1)
    assert np.array_equal(train.labels[idx], labels) and len(set(idx)) == 30
    assert not np.array_equal(idx, random_subset(train, 3, seed=2)[0])
    with pytest.raises(UserError, match="fewer than ipc"):
        random_subset(train, 41, seed=0)


def test_augmentations_under_jit():
    x = jax.random.uniform(jax.random.key(0), (4, 12, 12, 3))
    f = jax.jit(lambda r, x: augment.augment_batch(r, x, flip=True, crop_scale=(0.3, 1.0), shift=2))
    y = f(jax.random.key(1), x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    # A full-image crop box is the identity; a flip is a mirror image.
    np.testing.assert_allclose(augment.random_resized_crop(jax.random.key(2), x, (1.0, 1.0), (1.0, 1.0)), x,
                               atol=1e-5)
    flipped = augment.random_flip(jax.random.key(3), x)
    for a, b in zip(np.asarray(flipped), np.asarray(x)):
        assert np.allclose(a, b) or np.allclose(a, b[:, ::-1])
    shifted = augment.random_shift(jax.random.key(4), x, 2)
    assert shifted.shape == x.shape


def test_cutmix_pastes_one_box_from_a_permuted_batch():
    n = 8
    x = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, 16, 16, 1))
    mixed = np.asarray(jax.jit(lambda r: augment.augment_batch(r, x, cutmix_prob=1.0))(jax.random.key(5)))
    # Every pixel of image i is i or its partner's value j, one j per image, and each j is used once.
    partners = []
    for i in range(n):
        values = set(np.unique(mixed[i]).tolist())
        assert i in values and len(values) <= 2
        partners.append(max(values - {i}, default=i))
    assert sorted(partners) == list(range(n))
    # The pasted region is the same axis-aligned box in every image.
    boxes = [mixed[i, ..., 0] != i for i in range(n) if partners[i] != i]
    assert boxes and all((b == boxes[0]).all() for b in boxes)
    rows, cols = np.nonzero(boxes[0])
    assert boxes[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    # Probability 0 (or a batch that draws no CutMix) leaves the images alone.
    np.testing.assert_array_equal(augment.cutmix(jax.random.key(5), x, prob=0.0), x)
