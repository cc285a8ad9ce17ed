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

import json
import os

import numpy as np

from wmdd_jax import results
from wmdd_jax.data import ArraySource, load_split, random_subset
from wmdd_jax.errors import UserError
from wmdd_jax.fingerprint import fingerprint
from wmdd_jax.image_sets import image_set_id, images_per_class, load_image_set, load_soft_labels
from wmdd_jax.teacher import identity, load_teacher, model_from_spec, precision
from wmdd_jax.sharding import make_mesh, mesh_platform, process_index
from wmdd_jax.train import Run, spec_recipe, train_group

def say(message: str) -> None:
    """A line for the user, from process 0 only."""
    if process_index() == 0:
        print(message)


def _seeds(config) -> list[int]:
    seeds = [int(seed) for seed in config.eval.seeds]
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if not seeds or repeated:
        raise UserError(f"eval.seeds must be distinct seeds, got {tuple(config.eval.seeds)}"
                        + (f" ({repeated} repeated: one run would count as several)" if repeated else ""))
    return seeds


def student_recipe(config, mode: str, soft_labels: str | None) -> dict:
    """What defines the evaluation protocol of one row: the student recipe, the split, the labels."""
    spec = {k: v for k, v in spec_recipe(config.eval[mode]).items() if k != "model"}
    return {"spec": spec, "split": config.eval.split, "soft_labels": soft_labels}


def evaluate(config, workdir: str) -> list[dict]:
    """Trains and tests the students; returns the summary rows (also written to the work directory).

    Rows of ``eval/summary.jsonl`` are keyed by dataset, method, model, IPC, label mode and the
    student recipe (a fingerprint in ``recipe``): a rerun replaces its rows, never doubles them.
    The IPC reported is the set's own images per class (``None`` for a set with unequal classes,
    whose per-class counts are then in ``images_per_class``).
    """
    train_source = load_split(config.data, "train")
    test_source = load_split(config.data, config.eval.split)
    source_name = config.eval.source
    for mode in config.eval.label_modes:
        if mode not in ("hard", "soft"):
            raise UserError(f"eval.label_modes takes hard and soft, got {mode!r}")
    seeds = _seeds(config)
    stored = "soft" in config.eval.label_modes and config.eval.soft.get("relabel", "online") == "stored"
    counts = None
    if source_name == "random_real":
        method, fixed, path = "random_real", None, None
        stored = False  # a fresh draw per seed: its labels come from the teacher online
        ipc = int(config.ipc)
        if ipc <= 0:
            raise UserError(f"ipc must be a positive number of images per class, got {ipc}")
    else:
        path = os.path.join(workdir, "synthetic") if source_name == "synthetic" else source_name
        fixed = load_image_set(path, train_source)
        method = fixed[2]
        if not np.all(np.isfinite(fixed[0].images)):
            raise UserError(f"the image set at {path} holds NaN or infinite pixels; recreate it")
        ipc = images_per_class(fixed[0].labels, train_source.num_classes, f"the image set at {path}")
        if ipc is None:
            counts = np.bincount(fixed[0].labels, minlength=train_source.num_classes).tolist()
            say(f"{method}: the set has unequal classes ({counts} images); its rows say ipc null")
        elif ipc != int(config.ipc):
            say(f"{method}: the set has {ipc} images per class; that is the IPC reported (not "
                  f"config.ipc={config.ipc})")
    online = "soft" in config.eval.label_modes and not stored
    teacher = load_teacher(config, workdir, train_source) if "soft" in config.eval.label_modes else None
    teacher_id = identity(teacher) if teacher is not None else None
    images_id = image_set_id(fixed[0], fixed[1]) if fixed is not None else None
    soft_labels, data_seed = (load_soft_labels(path, config.eval.soft, len(fixed[0]),
                                               {"teacher": teacher_id, "images": images_id})
                              if stored else (None, None))

    rows = []
    out_root = os.path.join(workdir, "eval", method)
    ipc_dir = f"ipc{ipc}" if ipc is not None else f"images{len(fixed[0])}"
    mesh = make_mesh(config.mesh)
    for model_name in config.eval.models:
        for mode in config.eval.label_modes:
            spec = config.eval[mode]
            student_spec = spec.copy_and_resolve_references()
            with student_spec.unlocked():
                student_spec.model = model_name
            model = model_from_spec(student_spec, train_source.num_classes, config.conv_impl, mesh_platform(mesh))
            use_stored = mode == "soft" and soft_labels is not None
            run_name = f"{model_name}_{mode}" + ("_stored" if use_stored else "")
            runs = []
            for seed in seeds:
                if fixed is None:
                    idx, _ = random_subset(train_source, ipc, seed)
                    images, labels = train_source.get(idx)
                    data = ArraySource(images, labels, train_source.num_classes, train_source.mean,
                                       train_source.std, name="random_real")
                    weights = None
                    inputs = {"images": fingerprint({"indices": idx})}
                else:
                    data, weights, _ = fixed
                    inputs = {"images": images_id}
                if mode == "soft":
                    inputs["teacher"] = teacher_id
                runs.append(Run(data, os.path.join(out_root, ipc_dir, run_name, f"seed{seed}"), seed,
                                data_seed if use_stored else None, weights, inputs,
                                desc=f"{model_name} {mode} seed {seed}"))
            # The seeds train together (`train_group`): stacked in one program, or one after another
            # through one compiled step (eval.together).
            trained = train_group(model, student_spec, runs, test_source=test_source,
                                  teacher=teacher if mode == "soft" and online else None,
                                  stored_targets=soft_labels if use_stored else None,
                                  config_key=f"eval.{mode}", mesh=mesh, precision=precision(config),
                                  together=config.eval.together)
            accuracies = [result.test_accuracy for result in trained]
            for seed, accuracy in zip(seeds, accuracies):
                say(f"{method} ipc={ipc} {model_name} {mode} seed={seed}: {accuracy:.2f}%")
            labels_from = ("stored" if soft_labels is not None else "online") if mode == "soft" else None
            extra = {"soft_labels": labels_from, "teacher_id": teacher_id} if mode == "soft" else {}
            if counts is not None:
                extra["images_per_class"] = counts
            row = results.summary_row(dataset=config.data.name, method=method, model=model_name, ipc=ipc,
                                      label_mode=mode, values=accuracies, epochs=spec.epochs,
                                      split=config.eval.split, seeds=seeds,
                                      recipe=fingerprint(json.dumps(student_recipe(config, mode, labels_from),
                                                                    sort_keys=True, default=str)), **extra)
            if process_index() == 0:
                results.upsert_jsonl(os.path.join(workdir, "eval", "summary.jsonl"), row,
                                     keys=(*results.KEY_FIELDS, "recipe"))
            say(f"{method} ipc={ipc} {model_name} {mode}: {row['mean']:.2f} ± {row['std']:.2f} "
                f"({row['n_seeds']} seeds)")
            rows.append(row)
    return rows
