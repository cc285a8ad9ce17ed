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


def _crops_matching(out, image, pad):
    """NumPy reference of a shift by up to ``pad`` px: the offsets (dy, dx) in [0, 2 pad]^2 at which
    ``image``, zero-padded by ``pad`` on every side, cropped back to its size, equals ``out``."""
    h, w = image.shape[:2]
    padded = np.zeros((h + 2 * pad, w + 2 * pad, image.shape[2]), image.dtype)
    padded[pad:pad + h, pad:pad + w] = image
    return [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            if np.array_equal(padded[dy:dy + h, dx:dx + w], out)]


def _distinct_images(n, h, w, c):
    """Positive pixels, all different: every crop offset (and mirror image) gives another array."""
    return (1.0 + np.random.default_rng(0).permutation(n * h * w * c)).reshape(n, h, w, c).astype(np.float32)


def test_random_shift_is_a_zero_padded_crop_at_every_offset():
    """Each image is its zero-padded copy cropped at one offset in [0, 2 pad]^2 (NumPy reference),
    drawn per image and uniformly: over 1000 images each of the 25 offsets of pad = 2 occurs 15 to 70
    times (40 expected; outside that range has odds under 1e-4 per offset). A lost or an extra (clamped
    to the edge) row or column of offsets fails."""
    pad, x = 2, _distinct_images(1000, 6, 5, 2)
    out = np.asarray(jax.jit(lambda r, x: augment.random_shift(r, x, pad))(jax.random.key(4), x))
    assert out.shape == x.shape
    offsets = []
    for o, image in zip(out, x):
        (offset,) = _crops_matching(o, image, pad)  # exactly one offset gives this crop
        offsets.append(offset)
    counts = np.zeros((2 * pad + 1, 2 * pad + 1), int)
    np.add.at(counts, tuple(np.array(offsets).T), 1)
    assert 15 <= counts.min() and counts.max() <= 70, counts


def test_augmentations_under_jit():
    """Shift then flip, as one config asks: each image is a zero-padded crop, mirrored or not, and
    both outcomes occur; a full-image crop box is the identity."""
    x = _distinct_images(16, 6, 6, 1)
    y = np.asarray(jax.jit(lambda r, x: augment.augment_batch(r, x, flip=True, shift=1))(jax.random.key(1), x))
    mirrored = []
    for o, image in zip(y, x):
        as_is, flipped = _crops_matching(o, image, 1), _crops_matching(o[:, ::-1], image, 1)
        assert len(as_is) + len(flipped) == 1  # one crop, mirrored or not
        mirrored.append(bool(flipped))
    assert 0 < sum(mirrored) < len(mirrored), mirrored
    full_box = jax.jit(lambda r, x: augment.random_resized_crop(r, x, (1.0, 1.0), (1.0, 1.0)))  # one compile
    np.testing.assert_allclose(full_box(jax.random.key(2), x), x, rtol=1e-5)


def test_cutmix_pastes_one_box_from_a_permuted_batch():
    n = 8
    x = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, 16, 16, 1))
    # One program for both calls: op by op, the Beta draw alone compiles for seconds.
    both = jax.jit(lambda r: (augment.augment_batch(r, x, cutmix_prob=1.0), augment.cutmix(r, x, prob=0.0)))
    mixed, unmixed = (np.asarray(v) for v in both(jax.random.key(5)))
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
    np.testing.assert_array_equal(unmixed, x)
