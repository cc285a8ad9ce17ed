"""Stage ``pretrain``: train the teacher on the real training split; and loading it back."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from wmdd_jax import checkpoint as ckpt
from wmdd_jax import files
from wmdd_jax.data import Source, load_split
from wmdd_jax.errors import UserError
from wmdd_jax.fingerprint import fingerprint
from wmdd_jax.interop import load_torch_teacher
from wmdd_jax.models import create_model, model_names, model_options
from wmdd_jax.sharding import make_mesh, mesh_platform, process_index, run_platform
from wmdd_jax.train import train
from wmdd_jax.train_step import Precision, Teacher, init_variables

_MODEL_FILE = "model.json"
IDENTITY_FILE = "identity.json"


def model_from_spec(spec, num_classes: int, conv_impl: str = "auto", platform: str = "auto"):
    """The model of the training recipe ``spec``, built for ``platform`` (`wmdd_jax.models.create_model`)."""
    return create_model(spec.model, num_classes, conv_impl=conv_impl, platform=platform, **model_options(spec))


def _describe(spec, source: Source) -> dict:
    return {"model": spec.model, **model_options(spec), "num_classes": source.num_classes,
            "image_shape": list(source.image_shape)}


def precision(config) -> Precision:
    """The training steps' compute dtype and matmul precision (``config.dtype``, ``config.precision``)."""
    return Precision(config.dtype, config.precision)


def pretrain(config, workdir: str) -> Teacher:
    """Trains (or resumes, or reuses a finished) teacher in ``workdir/teacher``."""
    if config.teacher.checkpoint:
        return load_teacher(config, workdir)
    train_source = load_split(config.data, "train")
    test_source = load_split(config.data, "test")
    spec = config.teacher
    if ("norm" in model_options(spec) and spec.norm != "batch") or spec.label_mode != "hard":
        raise UserError("the teacher must be trained with hard labels and have BatchNorm layers (WMDD matches "
                        "their statistics): set --config.teacher.norm=batch and --config.teacher.label_mode=hard")
    mesh = make_mesh(config.mesh)
    model = model_from_spec(spec, train_source.num_classes, config.conv_impl, mesh_platform(mesh))
    out = os.path.join(workdir, "teacher")
    os.makedirs(out, exist_ok=True)
    files.write_json(os.path.join(out, _MODEL_FILE), _describe(spec, train_source))
    result = train(model, spec, train_source, out, seed=config.seed, test_source=test_source, desc="teacher",
                   config_key="teacher", mesh=mesh, precision=precision(config))
    teacher = Teacher(model, result.variables)
    files.write_json(os.path.join(out, IDENTITY_FILE), {"teacher": identity(teacher)})
    if process_index() != 0:
        return teacher
    print(f"teacher: test accuracy {result.test_accuracy:.2f}% after {result.steps} steps "
          f"({result.seconds / 60:.1f} min)")
    chance = 100.0 / train_source.num_classes
    if result.test_accuracy is not None and result.test_accuracy < 1.5 * chance:
        # Finite but useless (e.g. a learning rate that blew the weights up without a NaN): every
        # stage after it would run on it, so say so.
        print(f"teacher: warning: {result.test_accuracy:.2f}% is close to chance ({chance:.0f}%), so the "
              f"teacher learned nothing; see {out}/metrics.jsonl, lower --config.teacher.lr or train longer",
              file=sys.stderr)
    return teacher


def load_teacher(config, workdir: str, source: Source | None = None, platform: str | None = None) -> Teacher:
    """The teacher of ``config.teacher.checkpoint`` (a teacher folder) or of ``workdir/teacher``.

    ``source``: the training split of ``config.data``, if the caller has it loaded (it is checked
    against the teacher's classes and image shape; else it is loaded here). ``platform``: what its
    programs are compiled for (default: the run's devices, `wmdd_jax.sharding.run_platform`).
    """
    platform = run_platform() if platform is None else platform
    folder = config.teacher.checkpoint or os.path.join(workdir, "teacher")
    if os.path.isfile(folder):  # a PyTorch checkpoint (.pth/.pt) of the architecture config.teacher names
        return _finite(load_torch_teacher(config, folder, platform), folder)
    described = os.path.join(folder, _MODEL_FILE)
    if not os.path.exists(os.path.join(folder, "result.json")) or not os.path.exists(described):
        raise UserError(f"no finished teacher in {folder}: run 'python -m wmdd_jax pretrain' with this "
                        f"--workdir first, or set --config.teacher.checkpoint to a teacher folder")
    d = files.read_json(described, what="the teacher's architecture")
    if not isinstance(d, dict):
        raise UserError(f"{described} is unreadable: delete {folder} and rerun 'pretrain'")
    source = load_split(config.data, "train") if source is None else source
    if (d["num_classes"], tuple(d["image_shape"])) != (source.num_classes, tuple(source.image_shape)):
        raise UserError(f"the teacher in {folder} was trained on {d['num_classes']} classes of "
                        f"{tuple(d['image_shape'])} images, but {config.data.name} has {source.num_classes} of "
                        f"{tuple(source.image_shape)}: use a teacher of this dataset (--config.teacher.checkpoint)")
    if d.get("model") not in model_names():
        raise UserError(f"{described} names model {d.get('model')!r}, which this version does not have "
                        f"({', '.join(model_names())})")
    options = {k: v for k, v in d.items() if k not in ("model", "num_classes", "image_shape")}
    options.setdefault("first_padding", 1)  # ConvNet teachers written before the field existed used 1
    model = create_model(d["model"], d["num_classes"], conv_impl=config.conv_impl, platform=platform, **options)
    # Shapes only (no init to run); on this process's first device, as a fresh init would be: a
    # target without a sharding makes a multi-process restore wait on the other processes.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          jax.eval_shape(lambda: init_variables(model, jax.random.key(0), tuple(d["image_shape"]))))
    return _finite(Teacher(model, ckpt.load_tree(os.path.join(folder, "final"), target)), folder)


def _finite(teacher: Teacher, where: str) -> Teacher:
    """``teacher``, or a UserError if any weight or BN statistic is NaN or infinite."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(teacher.variables)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise UserError(f"the teacher in {where} has NaN or infinite values in "
                            f"{jax.tree_util.keystr(path)} (a diverged or corrupted teacher): retrain it (e.g. lower --config.teacher.lr) or pass "
                            f"another --config.teacher.checkpoint")
    return teacher


def identity(teacher: Teacher) -> str:
    """The teacher's fingerprint (`wmdd_jax.fingerprint`) over every parameter and BN statistic.

    Two teachers share it only if they compute the same function. Every stage downstream of the
    teacher records it in its ``recipe.json``, so a work directory's statistics, barycenters,
    images and students are never reused under another teacher. ``pretrain`` writes it to
    ``teacher/identity.json``.
    """
    return fingerprint(teacher.variables)
