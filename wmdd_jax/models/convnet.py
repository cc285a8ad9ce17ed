"""The ConvNet of the dataset-distillation literature (Gidaris & Komodakis 2018; DC, DM, MTT).

``depth`` blocks of [3x3 conv (width) -> norm -> ReLU -> 2x2 average pool], then
one linear classifier on the flattened map. Instance norm is the standard
evaluator; batch norm is used for teachers, whose BN statistics WMDD matches.

As in DC/DM, the first convolution pads 1-channel images by 3 (a 28x28 image
is seen as 32x32, so ConvNet-3 ends on 4x4x128 = 2048 features) and others by 1:
``first_padding=-1`` follows that rule; 0 or more sets the padding.

``weight_init="torch"`` draws PyTorch's defaults, as the official code's ``nn.Conv2d`` / ``nn.Linear``
layers have them: every weight and bias U(+-1/sqrt(fan_in)). ``"kaiming"`` is the draw of earlier
versions (kaiming-normal convolutions, LeCun-normal classifier, zero biases); its convolution
weights are about 2.4x larger, which under instance norm and AdamW changes each layer's effective
step size: students trained from it ended 0.5 points lower at IPC 50 (88.08 vs 88.61, docs/results.md).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from wmdd_jax.models.layers import (Conv, avg_pool2, check_weight_init, folds_into_norm, resolve_conv_impl,
                                    torch_layer_inits)
from wmdd_jax.models.norms import BN_STATS, BatchNorm, InstanceNorm, make_norm


class ConvNet(nn.Module):
    num_classes: int
    depth: int = 3
    width: int = 128
    norm: str = "instance"
    conv_impl: str = "auto"
    first_padding: int = -1
    weight_init: str = "torch"
    platform: str = "auto"  # the platform compiled for: picks conv_impl "auto" and the BN backward

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """x: [n, h, w, c] normalised images -> logits [n, classes] (and features [n, d])."""
        torch = check_weight_init(self.weight_init) == "torch"
        conv_impl = resolve_conv_impl(self.conv_impl, self.platform)
        for i in range(self.depth):
            padding = 1
            if i == 0:
                padding = self.first_padding if self.first_padding >= 0 else (3 if x.shape[-1] == 1 else 1)
            inits = torch_layer_inits(9 * x.shape[-1]) if torch else {}
            conv = Conv(self.width, 3, 1, padding, conv_impl=conv_impl, name=f"conv{i}", **inits)
            norm = make_norm(self.norm, train, name=f"norm{i}", platform=self.platform)
            folds = folds_into_norm(conv, x.shape[-1])
            if folds and isinstance(norm, InstanceNorm):
                kernel, _ = conv(x, weights_only=True)  # the bias drops out of the norm
                x = norm(x, conv=(kernel, conv.stride, conv.padding))
            elif folds and isinstance(norm, BatchNorm) and train and not self.is_mutable_collection(BN_STATS):
                kernel, bias = conv(x, weights_only=True)  # the bias enters only the running mean
                x = norm(x, conv=(kernel, bias, conv.stride, conv.padding))
            else:
                x = conv(x)
                if norm is not None:
                    x = norm(x)
            x = nn.relu(x)
            x = avg_pool2(x)
        features = x.reshape(x.shape[0], -1)
        inits = torch_layer_inits(features.shape[-1]) if torch else {}
        logits = nn.Dense(self.num_classes, name="classifier", **inits)(features)
        return (logits, features) if return_features else logits


ConvNet3 = functools.partial(ConvNet, depth=3)
ConvNet4 = functools.partial(ConvNet, depth=4)
