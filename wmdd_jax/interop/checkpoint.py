"""PyTorch checkpoint files (``.pth``/``.pt``) in and out, and a `Teacher` from one.

torch is imported only here, inside the functions that read or write a file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.data import load_split
from wmdd_jax.errors import UserError
from wmdd_jax.interop.state_dict import from_torch, to_torch
from wmdd_jax.models import create_model, model_options
from wmdd_jax.train_step import Teacher, init_variables

# Wrappers that prefix every key: DataParallel / DistributedDataParallel, torch.compile.
_PREFIXES = ("module.", "_orig_mod.")


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise UserError("reading or writing PyTorch files needs torch: install the CPU build with "
                        "'.venv/bin/pip install torch==2.13.0' (the 'torch' extra)") from e
    return torch


def torch_load(path: str) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True`` (tensors and plain containers, no code)."""
    torch = import_torch()
    if not os.path.isfile(path):
        raise UserError(f"no PyTorch file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for pickled objects, RuntimeError for a broken zip
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read as PyTorch tensors ({first}); if it pickles Python objects "
                        f"(e.g. an argparse Namespace) and you trust it, re-save only its tensors: "
                        f"torch.save(torch.load(p, weights_only=False)['state_dict'], 'weights.pth')") from e


def to_numpy(t) -> np.ndarray:
    """A tensor as a numpy array; floating tensors (bf16/fp16/fp64 too) become float32."""
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The ``state_dict`` in a PyTorch file as numpy arrays.

    Accepts a raw ``state_dict`` or a dict holding one under ``state_dict`` or ``model``
    (the ImageNet example's and SRe2L's training checkpoints); strips a ``module.`` (and
    ``_orig_mod.``) prefix shared by all keys.
    """
    obj = torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "detach") for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, Mapping) else f"dict with keys {list(obj)[:6]}"
        raise UserError(f"{path} holds a {kind}, not a state_dict: save model.state_dict(), or a dict "
                        f"with it under 'state_dict' or 'model'")
    state = {k: to_numpy(v) for k, v in obj.items()}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def save_torch_checkpoint(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a raw ``state_dict`` (numpy arrays -> tensors), loadable with ``torch.load``."""
    torch = import_torch()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


def _describe(config, num_classes: int, path: str) -> str:
    spec = config.teacher
    fields = {"model": spec.model, **model_options(spec)}
    flags = " ".join(f"--config.teacher.{k}={v}" for k, v in fields.items())
    return f"the model of {flags} ({num_classes} classes, {config.data.name}); set those fields to match {path}"


def load_torch_teacher(config, path: str, platform: str = "auto"):
    """A `Teacher` from a PyTorch checkpoint of the architecture ``config.teacher`` names.

    The model is ``config.teacher.model`` with its ``norm``, ``stem`` and ``width``, for the
    number of classes and the image shape of ``config.data``'s training split.
    """
    spec = config.teacher
    source = load_split(config.data, "train")
    image_shape = tuple(source.image_shape)
    model = create_model(spec.model, source.num_classes, conv_impl=config.conv_impl, platform=platform,
                         **model_options(spec))
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    variables = from_torch(load_torch_checkpoint(path), model, shapes, image_shape,
                           describe=_describe(config, source.num_classes, path))
    return Teacher(model, jax.tree.map(jnp.asarray, variables))


def save_torch_teacher(teacher, path: str, image_shape: tuple[int, int, int]) -> None:
    """Writes a teacher's weights as a PyTorch ``state_dict`` file (torchvision / DC ConvNet names)."""
    save_torch_checkpoint(path, to_torch(jax_to_numpy(teacher.variables), teacher.model, image_shape))


def jax_to_numpy(tree):
    return jax.tree.map(np.asarray, {k: v for k, v in tree.items() if k in ("params", "batch_stats")})
