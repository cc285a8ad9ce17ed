"""Stage ``relabel``: the teacher's soft labels for the synthetic set, stored (FKD / SRe2L style).

For the student recipe ``config.eval.soft``, every training step's batch (order and
augmentation fixed by ``config.eval.relabel_seed``, exactly as `wmdd_jax.train` will draw
them) is run through the teacher once and its logits are stored in float16:
``synthetic/soft_labels.npz`` holds ``logits [steps, batch, classes]``. Students of any
seed then train without the teacher (``config.eval.soft.relabel = "stored"``); the
online alternative (``"online"``) runs the teacher in the loop on the same batches.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from wmdd_jax import checkpoint as ckpt
from wmdd_jax.data import load_split
from wmdd_jax.errors import UserError
from wmdd_jax.fingerprint import fingerprint
from wmdd_jax.train import augmented_input, batch_indices, batch_plan, data_key

SOFT_LABELS_FILE = "soft_labels.npz"


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
    from wmdd_jax.evaluate import load_image_set
    from wmdd_jax.teacher import identity, load_teacher

    folder = os.path.join(workdir, "synthetic")
    path = os.path.join(folder, SOFT_LABELS_FILE)
    train_source = load_split(config.data, "train")
    data, weights, _ = load_image_set(folder, train_source)
    teacher = load_teacher(config, workdir)
    made_by = {"teacher": identity(teacher), "images": image_set_id(data, weights)}
    if os.path.exists(path):
        load_soft_labels(folder, config.eval.soft, len(data), made_by)  # the same teacher, set and recipe
        return path
    t0 = time.time()
    logits = store_soft_labels(teacher, config.eval.soft, data.images, data.mean, data.std,
                               config.eval.relabel_seed)
    ckpt.write_npz(path, logits=logits, data_seed=config.eval.relabel_seed, epochs=config.eval.soft.epochs,
                   batch_size=logits.shape[1], num_images=len(data), augment=_augment_recipe(config.eval.soft),
                   **made_by)
    print(f"relabel: {logits.shape[0]} steps x {logits.shape[1]} soft labels "
          f"({logits.nbytes / 2**20:.1f} MiB, {time.time() - t0:.0f} s)")
    return path


def _augment_recipe(spec) -> str:
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
    made_for = (int(z["epochs"]), int(z["num_images"]))
    augment = str(z["augment"]) if "augment" in z else None
    stored_by = {key: str(z[key]) if key in z else "unrecorded" for key in made_by}
    if made_for != (int(spec.epochs), num_images):
        raise UserError(f"{path} was made for {made_for[0]} epochs over {made_for[1]} images, the recipe is "
                        f"{spec.epochs} epochs over {num_images}: delete it and rerun 'relabel'")
    if augment is not None and augment != _augment_recipe(spec):
        raise UserError(f"{path} was made under augmentation {augment}, the recipe's is "
                        f"{_augment_recipe(spec)}: delete it and rerun 'relabel'")
    for key, want in made_by.items():
        if stored_by[key] != want:
            raise UserError(f"{path} was made from another {'teacher' if key == 'teacher' else 'image set'} "
                            f"({key} {stored_by[key]} there, {want} now): delete it and rerun 'relabel'")
    return logits, seed
