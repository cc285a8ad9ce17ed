"""ResNet-18 with torchvision's layout, an ImageNet stem and a small-image stem.

``weight_init="torch"`` draws what a torchvision ResNet starts from: every convolution
N(0, 2 / (kh * kw * c_out)) (kaiming-normal, fan-out), the classifier PyTorch's ``nn.Linear``
default U(+-1/sqrt(fan_in)). The small-image stems are drawn like a plain ``nn.Conv2d``
(U(+-1/sqrt(fan_in))): the usual way to build them replaces ``conv1`` of a built torchvision
model, after its init loop has run. ``"kaiming"``: the draw of earlier
versions (kaiming-normal fan-in convolutions, Flax's LeCun-normal classifier, zero bias).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax

from wmdd_jax.models.layers import (Conv, check_weight_init, resolve_conv_impl, torch_kaiming_fan_out,
                                    torch_layer_inits, torch_uniform)
from wmdd_jax.models.norms import BatchNorm


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    conv_impl: str = "auto"
    weight_init: str = "torch"
    platform: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        inits = dict(kernel_init=torch_kaiming_fan_out()) if check_weight_init(self.weight_init) == "torch" else {}
        conv = functools.partial(Conv, use_bias=False, conv_impl=self.conv_impl, **inits)
        bn = functools.partial(BatchNorm, use_running_average=not train, platform=self.platform)
        residual = x
        y = conv(self.features, 3, self.stride, 1, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = conv(self.features, 3, 1, 1, name="conv2")(y)
        y = bn(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = conv(self.features, 1, self.stride, 0, name="downsample_conv")(x)
            residual = bn(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet with BasicBlocks.

    Stems: ``"imagenet"`` = 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (torchvision);
    ``"small"`` = 3x3/1 conv, BN, ReLU, no pool (CIFAR-size images);
    ``"tiny"`` = 3x3/2 conv with padding 3, no pool (WMDD's Tiny-ImageNet teacher).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    stem: str = "imagenet"
    conv_impl: str = "auto"
    weight_init: str = "torch"
    platform: str = "auto"  # the platform compiled for: picks conv_impl "auto" and the BN backward

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        stems = {"imagenet": (7, 2, 3, True), "small": (3, 1, 1, False), "tiny": (3, 2, 3, False)}
        if self.stem not in stems:
            raise ValueError(f"stem must be one of {sorted(stems)}, got {self.stem!r}")
        k, s, p, pool = stems[self.stem]
        torch = check_weight_init(self.weight_init) == "torch"
        conv_impl = resolve_conv_impl(self.conv_impl, self.platform)
        stem_init = {}
        if torch:  # a small-image stem is a plain nn.Conv2d put in after torchvision's init (see above)
            fan_in = k * k * x.shape[-1]
            stem_init = dict(kernel_init=torch_kaiming_fan_out() if self.stem == "imagenet" else torch_uniform(fan_in))
        x = Conv(64, k, s, p, use_bias=False, conv_impl=conv_impl, name="conv1", **stem_init)(x)
        x = nn.relu(BatchNorm(use_running_average=not train, platform=self.platform, name="bn1")(x))
        if pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(64 * 2**i, stride, conv_impl, self.weight_init, self.platform,
                               name=f"layer{i + 1}_{j}")(x, train)
        features = x.mean(axis=(1, 2))
        inits = torch_layer_inits(features.shape[-1]) if torch else {}
        logits = nn.Dense(self.num_classes, name="fc", **inits)(features)
        return (logits, features) if return_features else logits


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
