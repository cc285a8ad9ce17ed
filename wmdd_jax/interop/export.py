"""Stage ``export``: this work directory's results in the PyTorch code's formats.

Writes, from whatever exists in ``workdir``:

- ``pytorch/images/new{k:03d}/class{k:03d}_id{i:03d}.png`` (or ``.jpg``): the distilled set
  ``synthetic/images.npz``, for SRe2L/WMDD/RDED-style evaluation (``ImageFolder``);
- ``pytorch/images.pt``: the same set as a normalised ``[n, c, h, w]`` tensor with labels,
  for DC/DM/MTT-style evaluation (layout in `wmdd_jax.interop.images`);
- ``pytorch/teacher.pth``: the teacher's ``state_dict`` with torchvision / DC ConvNet names.

``config.export.image_format`` (png | jpeg) and ``config.export.jpeg_quality`` choose the
image files; a config without an ``export`` section gets `DEFAULTS`. Like the other stages
it skips outputs that exist: delete ``pytorch/`` to export again.
"""

from __future__ import annotations

import os
import shutil

from wmdd_jax.checkpoint import read_npz
from wmdd_jax.data import load_split
from wmdd_jax.errors import UserError
from wmdd_jax.interop.checkpoint import save_torch_teacher
from wmdd_jax.interop.images import write_image_folder, write_tensor_file
from wmdd_jax.teacher import load_teacher

EXPORT_DIR = "pytorch"
DEFAULTS = {"image_format": "png", "jpeg_quality": 95}


def export(config, workdir: str) -> list[str]:
    """Writes the PyTorch-format files; returns their paths."""
    spec = dict(DEFAULTS, **(config.export.to_dict() if "export" in config else {}))
    out_dir = os.path.join(workdir, EXPORT_DIR)
    synthetic = os.path.join(workdir, "synthetic", "images.npz")
    has_teacher = bool(config.teacher.checkpoint) or os.path.exists(os.path.join(workdir, "teacher", "result.json"))
    if not os.path.exists(synthetic) and not has_teacher:
        raise UserError(f"nothing to export in {workdir}: run 'pretrain' or the distillation stages first")
    source = load_split(config.data, "train")
    written = []
    if os.path.exists(synthetic):
        z = read_npz(synthetic, "recover")
        images, labels = z["images"], z["labels"]
        weights = z["weights"] if "weights" in z else None
        method = str(z["method"]) if "method" in z else None
        folder = os.path.join(out_dir, "images")
        _write_once(folder, lambda tmp: write_image_folder(tmp, images, labels, weights, method,
                                                           spec["image_format"], spec["jpeg_quality"]))
        tensors = os.path.join(out_dir, "images.pt")
        _write_once(tensors, lambda tmp: write_tensor_file(tmp, images, labels, source.mean, source.std,
                                                           weights, method))
        written += [folder, tensors]
    if has_teacher:
        path = os.path.join(out_dir, "teacher.pth")
        _write_once(path, lambda tmp: save_torch_teacher(load_teacher(config, workdir), tmp,
                                                         tuple(source.image_shape)))
        written.append(path)
    return written


def _write_once(path: str, write) -> None:
    """Runs ``write(tmp)`` and renames ``tmp`` to ``path``; skips an existing ``path`` (a finished export)."""
    if os.path.exists(path):
        print(f"export: {path} exists, kept")
        return
    tmp = path + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)  # an interrupted export of ours
    write(tmp)
    os.replace(tmp, path)
    print(f"export: {path}")
