"""The config checked as a whole before any stage runs: a typo fails in a second, not after training.

``check_config(config)`` raises one `UserError` naming the ``--config.`` key, what it holds and
what it takes. It checks names and ranges that the stages would only meet later (an evaluation
model name after an hour of teacher training), not what needs the data or the work directory.
"""

from __future__ import annotations

import math

from wmdd_jax.data import available
from wmdd_jax.errors import UserError
from wmdd_jax.models import WEIGHT_INITS, model_names
from wmdd_jax.train import TOGETHER

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "step", "constant")
NORMS = ("instance", "batch", "none")
STEMS = ("imagenet", "small", "tiny")
CONV_IMPLS = ("auto", "winograd", "im2col", "lax")
DTYPES = ("float32", "bfloat16")
PRECISIONS = ("default", "high", "highest")


def _fail(key: str, value, wants: str):
    raise UserError(f"--config.{key}={value!r} is not valid: {wants}")


def _one_of(config, key: str, choices) -> None:
    value = _get(config, key)
    if value is not _MISSING and value not in choices:
        _fail(key, value, f"use one of {', '.join(map(str, choices))}")


_MISSING = object()


def _get(config, key: str):
    """The value at ``key``; ``_MISSING`` where a config lacks it (the check is then skipped)."""
    node = config
    for part in key.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


def _positive_int(config, key: str, zero_ok: bool = False) -> None:
    value = _get(config, key)
    if value is _MISSING:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        _fail(key, value, f"it takes a whole number {'>= 0' if zero_ok else '>= 1'}")


def _finite_number(config, key: str, positive: bool = False) -> None:
    value = _get(config, key)
    if value is _MISSING:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0) or value < 0:
        _fail(key, value, f"it takes a finite number {'> 0' if positive else '>= 0'}")


def check_train_spec(config, key: str) -> None:
    """One training recipe (``teacher``, ``eval.hard``, ``eval.soft``)."""
    _one_of(config, f"{key}.model", model_names())
    _one_of(config, f"{key}.norm", NORMS)
    _one_of(config, f"{key}.stem", STEMS)
    _one_of(config, f"{key}.weight_init", WEIGHT_INITS)
    _one_of(config, f"{key}.optimizer", OPTIMIZERS)
    _one_of(config, f"{key}.schedule", SCHEDULES)
    _one_of(config, f"{key}.label_mode", ("hard", "soft"))
    for name in ("width", "epochs", "batch_size", "checkpoint_every_steps", "log_every_steps"):
        _positive_int(config, f"{key}.{name}")
    for name in ("lr",):
        _finite_number(config, f"{key}.{name}", positive=True)
    for name in ("momentum", "weight_decay"):
        _finite_number(config, f"{key}.{name}")
    _finite_number(config, f"{key}.temperature", positive=True)
    crop = _get(config, f"{key}.augment.crop_scale")
    if crop is not None and crop is not _MISSING and not (len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1):
        _fail(f"{key}.augment.crop_scale", crop, "it takes (lo, hi) with 0 < lo <= hi <= 1, or None")
    cutmix = _get(config, f"{key}.augment.cutmix")
    if cutmix is not _MISSING and not 0 <= cutmix <= 1:
        _fail(f"{key}.augment.cutmix", cutmix, "it is a probability in [0, 1]")


def check_config(config) -> None:
    """Raises a `UserError` for the first key of ``config`` that no stage could run with."""
    _positive_int(config, "ipc")
    _one_of(config, "conv_impl", CONV_IMPLS)
    _one_of(config, "dtype", DTYPES)
    _one_of(config, "precision", PRECISIONS)
    _one_of(config, "eval.together", TOGETHER)
    _one_of(config, "data.name", available())
    _positive_int(config, "data.validation_per_class", zero_ok=True)
    check_train_spec(config, "teacher")
    for mode in ("hard", "soft"):
        check_train_spec(config, f"eval.{mode}")
    models = tuple(config.eval.models)
    if not models:
        _fail("eval.models", models, "name at least one model")
    for name in models:
        if name not in model_names():
            _fail("eval.models", models, f"{name!r} is not a model; use {', '.join(model_names())}")
    modes = tuple(config.eval.label_modes)
    if not modes or any(mode not in ("hard", "soft") for mode in modes) or len(set(modes)) != len(modes):
        _fail("eval.label_modes", modes, "name hard and/or soft, each once")
    seeds = tuple(config.eval.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        _fail("eval.seeds", seeds, "give distinct whole numbers (a repeated seed would count one run twice)")
    _one_of(config, "eval.split", ("test", "validation"))
    _one_of(config, "eval.soft.relabel", ("online", "stored"))
    if config.eval.hard.label_mode != "hard" or config.eval.soft.label_mode != "soft":
        raise UserError("eval.hard.label_mode must be 'hard' and eval.soft.label_mode 'soft' (choose the label "
                        "modes with --config.eval.label_modes)")
    s = "synthesis"
    _positive_int(config, f"{s}.iterations", zero_ok=True)
    for name in ("batch_size", "checkpoint_every_steps", "log_every_steps"):
        _positive_int(config, f"{s}.{name}")
    _finite_number(config, f"{s}.lr", positive=True)
    for name in ("r_bn", "r_wb", "first_bn_multiplier"):
        _finite_number(config, f"{s}.{name}")
    _one_of(config, f"{s}.init", ("real", "noise"))
    _positive_int(config, f"{s}.jitter", zero_ok=True)
    _positive_int(config, f"{s}.chunk_images", zero_ok=True)
    _positive_int(config, "barycenter.max_features_per_class", zero_ok=True)
    _positive_int(config, "barycenter.num_iterations")
    _positive_int(config, "barycenter.batch_size", zero_ok=True)
    mf = config.barycenter.max_features_per_class
    if mf and mf < config.ipc:
        _fail("barycenter.max_features_per_class", mf, f"keep at least ipc={config.ipc} features per class (or 0: all)")
    if not all(isinstance(n, int) and (n > 0 or n == -1) for n in config.mesh.shape) or list(
            config.mesh.shape).count(-1) > 1:
        _fail("mesh.shape", tuple(config.mesh.shape), "give device counts per axis, at most one -1 (the rest)")
    if len(tuple(config.mesh.axes)) != len(tuple(config.mesh.shape)):
        _fail("mesh.axes", tuple(config.mesh.axes), f"name one axis per entry of mesh.shape {tuple(config.mesh.shape)}")
    _one_of(config, "export.image_format", ("png", "jpeg"))
    _finite_number(config, "compilation_cache.min_compile_secs")
    size = _get(config, "compilation_cache.max_size_mb")
    if size is not _MISSING and (isinstance(size, bool) or not isinstance(size, int) or size < -1):
        _fail("compilation_cache.max_size_mb", size, "it takes a whole number of MiB >= 0, or -1 (no bound)")
