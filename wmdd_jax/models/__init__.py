"""Flax models and their registry.

``create_model(name, num_classes, **options)`` builds a model by the name used in
configs: ``convnet3``, ``convnet4`` (``norm``: instance | batch | none) and
``resnet18`` (``stem``: imagenet | small | tiny); every model takes ``weight_init`` (torch | kaiming:
how fresh weights are drawn, `WEIGHT_INITS`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn

from wmdd_jax.models.convnet import ConvNet, ConvNet3, ConvNet4
from wmdd_jax.models.layers import WEIGHT_INITS
from wmdd_jax.models.norms import BN_STATS, BatchNorm, InstanceNorm, collect_bn_moments, pooled_moments
from wmdd_jax.models.resnet import ResNet, ResNet18


class ModelEntry(NamedTuple):
    """A registered model: its builder and the fields of a training recipe (``configs/default.py``
    ``train_spec``) that it takes, besides ``num_classes``, ``conv_impl`` and ``platform``."""

    build: Callable[..., nn.Module]
    options: tuple[str, ...]


# Adding a model is one entry here: configs, teachers' model.json, the CLI's name check and the
# PyTorch key maps (by family: any ConvNet or ResNet) follow from it.
_CONVNET = ("norm", "width", "first_padding", "weight_init")
_REGISTRY = {
    "convnet3": ModelEntry(ConvNet3, _CONVNET),
    "convnet4": ModelEntry(ConvNet4, _CONVNET),
    "resnet18": ModelEntry(ResNet18, ("stem", "weight_init")),
}


def register_model(name: str, build: Callable[..., nn.Module], options: tuple[str, ...]) -> None:
    """Adds a model under ``name``: ``build(num_classes=..., conv_impl=..., platform=..., **options)`` returns it.

    A ConvNet or ResNet variant (e.g. ``functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))``) also
    converts to and from PyTorch with no further change.
    """
    _REGISTRY[name] = ModelEntry(build, tuple(options))


def model_names() -> tuple[str, ...]:
    """The names ``create_model`` takes (configs' ``model`` / ``eval.models``)."""
    return tuple(sorted(_REGISTRY))


def model_options(spec) -> dict:
    """The fields of the training recipe ``spec`` (a config section with ``model``) its model takes."""
    return {key: spec[key] for key in _entry(spec["model"]).options}


def _entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, *, conv_impl: str = "auto", platform: str = "auto",
                 **options) -> nn.Module:
    """Builds a registered model; ``options`` (e.g. ``norm``, ``width``, ``stem``) a model does not take
    are ignored, so one recipe serves every model.

    ``platform``: the platform its programs are compiled for (``cpu``, ``gpu``, ``tpu``; ``auto``: jax's
    default backend). It picks the CPU-only kernels (Winograd convolutions for ``conv_impl="auto"``,
    BatchNorm's hand-written backward) only for ``cpu``.
    """
    entry = _entry(name)
    return entry.build(num_classes=num_classes, conv_impl=conv_impl, platform=platform,
                       **{k: v for k, v in options.items() if k in entry.options})


__all__ = [
    "BN_STATS", "BatchNorm", "ConvNet", "ConvNet3", "ConvNet4", "InstanceNorm", "ResNet", "ResNet18",
    "WEIGHT_INITS", "ModelEntry", "collect_bn_moments", "create_model", "model_names", "model_options",
    "pooled_moments", "register_model",
]
