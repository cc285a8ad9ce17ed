"""The evaluate stage's rows: keyed and replaced, the set's real IPC, refused sets and seeds."""

import json
import os

import numpy as np
import pytest

from tests.conftest import tiny_config
from wmdd_jax.checkpoint import write_npz
from wmdd_jax.errors import UserError
from wmdd_jax.evaluate import evaluate


def _config(folder):
    config = tiny_config()
    config.eval.source = str(folder)
    config.eval.hard.epochs = 1
    config.eval.hard.batch_size = 8
    return config


def _image_set(folder, per_class, seed=0):
    """A set of random images: ``per_class[k]`` images of class ``k``."""
    labels = np.repeat(np.arange(len(per_class)), per_class).astype(np.int32)
    images = np.random.default_rng(seed).uniform(size=(len(labels), 28, 28, 1)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    write_npz(os.path.join(folder, "images.npz"), images=images, labels=labels, method=np.array("mine"))
    return folder


def _rows(workdir):
    with open(os.path.join(workdir, "eval", "summary.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_rows_are_replaced_and_report_the_sets_own_ipc(tmp_path):
    config = _config(_image_set(tmp_path / "set", [2] * 10))
    config.ipc = 5  # not what the set holds: the row says 2
    workdir = str(tmp_path / "w")
    first = evaluate(config, workdir)
    assert [r["ipc"] for r in first] == [2]
    evaluate(config, workdir)  # a rerun (finished students, reused) replaces its row
    rows = _rows(workdir)
    assert len(rows) == 1 and rows[0]["ipc"] == 2 and rows[0]["values"] == first[0]["values"]
    # Another student recipe in the same work directory is refused; the row stays as it was.
    config.eval.hard.lr = 0.02
    with pytest.raises(UserError, match="another recipe"):
        evaluate(config, workdir)
    assert _rows(workdir) == rows
    # Another image set under the same method name: its students are not the old ones.
    config.eval.source = str(_image_set(tmp_path / "set2", [2] * 10, seed=1))
    config.eval.hard.lr = 0.01
    with pytest.raises(UserError, match="another recipe \\(images: "):
        evaluate(config, workdir)


def test_unequal_and_incomplete_sets(tmp_path):
    config = _config(_image_set(tmp_path / "unequal", [2] * 9 + [3]))
    (row,) = evaluate(config, str(tmp_path / "w1"))
    assert row["ipc"] is None and row["images_per_class"] == [2] * 9 + [3]
    config = _config(_image_set(tmp_path / "nine", [2] * 9 + [0]))
    with pytest.raises(UserError, match=r"no images of classes \[9\] \(of 10\)"):
        evaluate(config, str(tmp_path / "w2"))


def test_repeated_seeds_are_refused(tmp_path):
    config = _config(_image_set(tmp_path / "set", [1] * 10))
    config.eval.seeds = (0, 1, 0)
    with pytest.raises(UserError, match=r"\[0\] repeated"):
        evaluate(config, str(tmp_path / "w"))


def test_image_sets_that_cannot_be_read_are_named(tmp_path):
    from wmdd_jax.interop.images import write_image_folder

    folder = tmp_path / "folder"
    labels = np.repeat(np.arange(10), 1)
    write_image_folder(str(folder), np.random.default_rng(0).uniform(size=(10, 28, 28, 1)), labels)
    (folder / "new003" / "class003_id000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match=r"new003/class003_id000.png is not a readable image"):
        evaluate(_config(folder), str(tmp_path / "w1"))
    # Class folders under another name than the layout's new000, new001, ...
    renamed = tmp_path / "renamed"
    for k in range(10):
        (renamed / f"class{k:03d}").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds folders class000, class001, class002, \.\.\. but no image set: "
                                        r"class folders must be named new000"):
        evaluate(_config(renamed), str(tmp_path / "w2"))
    # A finished set cut off mid-file (written in place by an older version, or a damaged disk).
    cut = _image_set(tmp_path / "cut", [1] * 10)
    data = (cut / "images.npz").read_bytes()
    (cut / "images.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"images.npz cannot be read .*delete it and rerun the 'recover' stage"):
        evaluate(_config(cut), str(tmp_path / "w3"))
