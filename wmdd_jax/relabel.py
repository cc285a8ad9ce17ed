"""Stage ``relabel``: the teacher's soft labels for the synthetic set, stored (FKD / SRe2L style).

For the student recipe ``config.eval.soft``, every training step's batch (order and
augmentation fixed by ``config.eval.relabel_seed``, exactly as `wmdd_jax.train` will draw
them) is run through the teacher once and its logits are stored in float16:
``synthetic/soft_labels.npz`` holds ``logits [steps, batch, classes]``. Students of any
seed then train without the teacher (``config.eval.soft.relabel = "stored"``); the
online alternative (``"online"``) runs the teacher in the loop on the same batches.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from wmdd_jax import checkpoint as ckpt
from wmdd_jax.data import load_split
from wmdd_jax.image_sets import SOFT_LABELS_FILE, augment_recipe, image_set_id, load_image_set, load_soft_labels
from wmdd_jax.teacher import identity, load_teacher
from wmdd_jax.train_step import augmented_input, batch_indices, batch_plan, data_key

__all__ = ["SOFT_LABELS_FILE", "load_soft_labels", "relabel", "store_soft_labels"]


def store_soft_labels(teacher, spec, images: np.ndarray, mean, std, data_seed: int,
                      verbose: bool = True) -> np.ndarray:
    """[steps, batch, classes] float16 teacher logits on each step's augmented batch."""
    batch_size, total_steps = batch_plan(len(images), spec)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    @jax.jit
    def logits_at(batch, rng, step):
        x = augmented_input(spec, batch, mean, std, rng, step)
        return teacher.model.apply(teacher.variables, x, train=False).astype(np.float16)

    rng = data_key(data_seed)
    out = []
    for step in tqdm(range(total_steps), desc="relabel", disable=not verbose, leave=False):
        idx = batch_indices(len(images), batch_size, step, data_seed)
        out.append(logits_at(images[idx], rng, step))
    return np.stack([np.asarray(o) for o in out])


def relabel(config, workdir: str) -> str:
    """Writes ``synthetic/soft_labels.npz`` (skipped when present for this teacher and set); returns its path."""
    folder = os.path.join(workdir, "synthetic")
    path = os.path.join(folder, SOFT_LABELS_FILE)
    train_source = load_split(config.data, "train")
    data, weights, _ = load_image_set(folder, train_source)
    teacher = load_teacher(config, workdir, train_source)
    made_by = {"teacher": identity(teacher), "images": image_set_id(data, weights)}
    if os.path.exists(path):
        load_soft_labels(folder, config.eval.soft, len(data), made_by)  # the same teacher, set and recipe
        return path
    t0 = time.time()
    logits = store_soft_labels(teacher, config.eval.soft, data.images, data.mean, data.std,
                               config.eval.relabel_seed)
    ckpt.write_npz(path, logits=logits, data_seed=config.eval.relabel_seed, epochs=config.eval.soft.epochs,
                   batch_size=logits.shape[1], num_images=len(data), augment=augment_recipe(config.eval.soft),
                   **made_by)
    print(f"relabel: {logits.shape[0]} steps x {logits.shape[1]} soft labels "
          f"({logits.nbytes / 2**20:.1f} MiB, {time.time() - t0:.0f} s)")
    return path


