"""Stage ``evaluate``: train fresh students on a small image set and report test accuracy.

The set is ``config.eval.source``: ``random_real`` (``config.ipc`` random real
training images per class, a fresh draw per seed), ``synthetic`` (this work
directory's distilled set, ``synthetic/images.npz``) or a folder holding an
``images.npz``. For every model in ``eval.models``, label mode in
``eval.label_modes`` and seed in ``eval.seeds`` one student is trained with the
recipe ``eval.hard`` or ``eval.soft``; the mean and std over seeds are written
as JSON lines to ``workdir/eval/summary.jsonl``.
"""

from __future__ import annotations

import os

import numpy as np

from wmdd_jax import results
from wmdd_jax.data import ArraySource, Source, load_split, random_subset
from wmdd_jax.errors import UserError
from wmdd_jax.relabel import load_soft_labels
from wmdd_jax.teacher import load_teacher, model_from_spec
from wmdd_jax.train import train

SYNTHETIC_FILE = "images.npz"


def load_image_set(path: str, like: Source) -> tuple[ArraySource, np.ndarray, str]:
    """A saved set: ``images`` [n, h, w, c] in [0, 1], ``labels`` [n], optional ``weights`` [n], ``method``."""
    file = path if path.endswith(".npz") else os.path.join(path, SYNTHETIC_FILE)
    from wmdd_jax import interop

    if not os.path.exists(file) and interop.is_torch_image_set(path):  # class folders or a .pt file
        return interop.load_torch_image_set(path, like)
    if not os.path.exists(file):
        raise UserError(f"no image set at {file}: run the distillation stages first, or pass "
                        f"--config.eval.source=random_real")
    with np.load(file) as z:
        images, labels = z["images"].astype(np.float32), z["labels"].astype(np.int32)
        weights = z["weights"].astype(np.float32) if "weights" in z else np.ones(len(labels), np.float32)
        method = str(z["method"]) if "method" in z else "synthetic"
    if tuple(images.shape[1:]) != tuple(like.image_shape):
        raise UserError(f"images in {file} are {images.shape[1:]}, the dataset's are {like.image_shape}")
    return ArraySource(images, labels, like.num_classes, like.mean, like.std, name=file), weights, method


def evaluate(config, workdir: str) -> list[dict]:
    """Trains and tests the students; returns the summary rows (also written to the work directory)."""
    train_source = load_split(config.data, "train")
    test_source = load_split(config.data, config.eval.split)
    source_name = config.eval.source
    for mode in config.eval.label_modes:
        if mode not in ("hard", "soft"):
            raise UserError(f"eval.label_modes takes hard and soft, got {mode!r}")
    stored = "soft" in config.eval.label_modes and config.eval.soft.get("relabel", "online") == "stored"
    if source_name == "random_real":
        method, fixed, path = "random_real", None, None
        stored = False  # a fresh draw per seed: its labels come from the teacher online
    else:
        path = os.path.join(workdir, "synthetic") if source_name == "synthetic" else source_name
        fixed = load_image_set(path, train_source)
        method = fixed[2]
    online = "soft" in config.eval.label_modes and not stored
    teacher = load_teacher(config, workdir) if online else None
    soft_labels, data_seed = (load_soft_labels(path, config.eval.soft, len(fixed[0])) if stored
                              else (None, None))

    rows = []
    out_root = os.path.join(workdir, "eval", method)
    for model_name in config.eval.models:
        for mode in config.eval.label_modes:
            spec = config.eval[mode]
            accuracies = []
            for seed in config.eval.seeds:
                if fixed is None:
                    idx, _ = random_subset(train_source, config.ipc, seed)
                    images, labels = train_source.get(idx)
                    data = ArraySource(images, labels, train_source.num_classes, train_source.mean,
                                       train_source.std, name="random_real")
                    weights = None
                else:
                    data, weights, _ = fixed
                student_spec = spec.copy_and_resolve_references()
                with student_spec.unlocked():
                    student_spec.model = model_name
                model = model_from_spec(student_spec, train_source.num_classes, config.conv_impl)
                use_stored = mode == "soft" and soft_labels is not None
                run_name = f"{model_name}_{mode}" + ("_stored" if use_stored else "")
                run_dir = os.path.join(out_root, f"ipc{config.ipc}", run_name, f"seed{seed}")
                result = train(model, student_spec, data, run_dir, seed=seed, test_source=test_source,
                               teacher=teacher, weights=weights, desc=f"{model_name} {mode} seed {seed}",
                               stored_targets=soft_labels if use_stored else None,
                               data_seed=data_seed if use_stored else None)
                accuracies.append(result.test_accuracy)
                print(f"{method} ipc={config.ipc} {model_name} {mode} seed={seed}: {result.test_accuracy:.2f}%")
            extra = {"soft_labels": "stored" if soft_labels is not None else "online"} if mode == "soft" else {}
            row = results.summary_row(dataset=config.data.name, method=method, model=model_name, ipc=config.ipc,
                                      label_mode=mode, values=accuracies, epochs=spec.epochs,
                                      split=config.eval.split, **extra)
            results.append_jsonl(os.path.join(workdir, "eval", "summary.jsonl"), row)
            print(f"{method} ipc={config.ipc} {model_name} {mode}: {row['mean']:.2f} ± {row['std']:.2f} "
                  f"({row['n_seeds']} seeds)")
            rows.append(row)
    return rows
