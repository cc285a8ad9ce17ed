"""Flax models and their registry.

``create_model(name, num_classes, **options)`` builds a model by the name used in
configs: ``convnet3``, ``convnet4`` (``norm``: instance | batch | none) and
``resnet18`` (``stem``: imagenet | small | tiny).
"""

from __future__ import annotations

import flax.linen as nn

from wmdd_jax.models.convnet import ConvNet, ConvNet3, ConvNet4
from wmdd_jax.models.layers import BN_STATS, BatchNorm, InstanceNorm, collect_bn_moments, pooled_moments
from wmdd_jax.models.resnet import ResNet, ResNet18

_REGISTRY = {"convnet3": ConvNet3, "convnet4": ConvNet4, "resnet18": ResNet18}


def model_names() -> tuple[str, ...]:
    """The names ``create_model`` takes (configs' ``model`` / ``eval.models``)."""
    return tuple(sorted(_REGISTRY))


def create_model(name: str, num_classes: int, *, norm: str = "instance", stem: str = "small",
                 width: int = 128, conv_impl: str = "auto", first_padding: int = -1) -> nn.Module:
    """Builds a registered model; options a model does not take are ignored."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_REGISTRY)}")
    if name.startswith("convnet"):
        return _REGISTRY[name](num_classes=num_classes, norm=norm, width=width, conv_impl=conv_impl,
                               first_padding=first_padding)
    return _REGISTRY[name](num_classes=num_classes, stem=stem, conv_impl=conv_impl)


__all__ = [
    "BN_STATS", "BatchNorm", "ConvNet", "ConvNet3", "ConvNet4", "InstanceNorm", "ResNet", "ResNet18",
    "collect_bn_moments", "create_model", "model_names", "pooled_moments",
]
