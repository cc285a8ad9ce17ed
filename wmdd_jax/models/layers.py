"""Building blocks shared by the models: convolution, normalisation, pooling.

Every layer computes in NHWC. Parameters follow Flax's ``nn.Conv`` layout (kernel
``[kh, kw, in, out]``) so that a checkpoint is the same whichever convolution
implementation runs it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# The collection BatchNorm layers sow their input moments into (see `BatchNorm`).
BN_STATS = "bn_stats"


def resolve_conv_impl(impl: str) -> str:
    """Maps ``"auto"`` to the fast convolution for the default backend.

    XLA's CPU convolution runs at about half PyTorch's speed on small images,
    while one big matrix product over im2col patches reaches the CPU's matmul
    peak; on GPU and TPU ``lax.conv`` is the fast path.
    """
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "lax"
    if impl not in ("im2col", "lax"):
        raise ValueError(f"conv_impl must be 'auto', 'im2col' or 'lax', got {impl!r}")
    return impl


def im2col_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """Convolution as one matmul over shifted slices.

    Args:
      x: [n, h, w, c_in] input.
      kernel: [kh, kw, c_in, c_out].
    Returns:
      [n, h_out, w_out, c_out], identical (up to rounding) to
      ``lax.conv_general_dilated`` with symmetric ``padding`` and ``stride``.
    """
    kh, kw, cin, cout = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h_out = (x.shape[1] - kh) // stride + 1
    w_out = (x.shape[2] - kw) // stride + 1
    cols = [
        x[:, i : i + (h_out - 1) * stride + 1 : stride, j : j + (w_out - 1) * stride + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    # Channel order (i, j, c_in) matches kernel.reshape(kh * kw * c_in, c_out).
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
    """2-D convolution with PyTorch-style symmetric padding and a choice of kernel."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    use_bias: bool = True
    conv_impl: str = "auto"
    kernel_init: Any = nn.initializers.kaiming_normal()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        kernel = kernel.astype(x.dtype)
        if resolve_conv_impl(self.conv_impl) == "im2col":
            y = im2col_conv(x, kernel, self.stride, self.padding)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=[(self.padding, self.padding)] * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


class InstanceNorm(nn.Module):
    """Per-sample, per-channel normalisation with affine parameters.

    Equal to PyTorch's ``nn.GroupNorm(C, C)``, the instance norm of the
    dataset-distillation ConvNet.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        mean = x.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return y * scale + bias


class BatchNorm(nn.Module):
    """Batch normalisation that also reports the statistics of its input.

    Running statistics follow PyTorch (``momentum`` is PyTorch's, the running
    variance is updated with the unbiased batch variance), so converted weights
    behave identically.

    When the ``bn_stats`` collection is mutable the layer sows, per sample, the
    per-channel mean and (biased) variance of its input over spatial positions:
    ``(mean [n, c], var [n, c])``. Any grouping of samples (the whole batch, one
    class) then gets its exact statistics by `pooled_moments`.
    """

    use_running_average: bool = False
    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        reduce_axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))

        if self.is_mutable_collection(BN_STATS):
            spatial = reduce_axes[1:]
            m = x.mean(axis=spatial)
            v = jnp.square(x - jnp.expand_dims(m, spatial)).mean(axis=spatial)
            self.sow(BN_STATS, "moments", (m, v))

        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean = x.mean(axis=reduce_axes)
            var = jnp.square(x - mean).mean(axis=reduce_axes)
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return y * scale + bias


def make_norm(kind: str, train: bool, name: str) -> nn.Module | None:
    if kind == "instance":
        return InstanceNorm(name=name)
    if kind == "batch":
        return BatchNorm(use_running_average=not train, name=name)
    if kind == "none":
        return None
    raise ValueError(f"norm must be 'instance', 'batch' or 'none', got {kind!r}")


def avg_pool2(x: Array) -> Array:
    """2x2 average pooling, stride 2, dropping an odd last row/column like PyTorch."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def pooled_moments(
    mean: Array, var: Array, segment_ids: Array | None = None, num_segments: int = 1,
    weights: Array | None = None,
) -> tuple[Array, Array]:
    """Exact mean and biased variance of a group of samples from per-sample moments.

    Uses the law of total variance: var = E[var_i] + Var[mean_i], which stays
    accurate in float32 where E[x^2] - E[x]^2 would not.

    Args:
      mean, var: [n, c] per-sample spatial mean and variance (from `BatchNorm`).
      segment_ids: optional [n] int group of each sample (e.g. its class).
      num_segments: number of groups when ``segment_ids`` is given.
      weights: optional [n] sample weights (0 drops a sample, e.g. padding).
    Returns:
      ([c], [c]) without segments, else ([num_segments, c], [num_segments, c]).
    """
    w = jnp.ones(mean.shape[:1], mean.dtype) if weights is None else weights.astype(mean.dtype)
    if segment_ids is None:
        segment_ids = jnp.zeros(mean.shape[:1], jnp.int32)
        squeeze, num_segments = True, 1
    else:
        squeeze = False
    seg_sum = lambda a: jax.ops.segment_sum(a, segment_ids, num_segments)  # noqa: E731
    count = jnp.maximum(seg_sum(w), 1e-12)[:, None]
    mu = seg_sum(w[:, None] * mean) / count
    within = seg_sum(w[:, None] * var) / count
    between = seg_sum(w[:, None] * jnp.square(mean - mu[segment_ids])) / count
    sigma2 = within + between
    return (mu[0], sigma2[0]) if squeeze else (mu, sigma2)


def collect_bn_moments(state: dict) -> dict[str, tuple[Array, Array]]:
    """The sown per-sample ``(mean, var)`` of every BatchNorm layer's input.

    Returns a dict from the layer's path (``"Block_0/BatchNorm_1"``) to
    ``(mean [n, c], var [n, c])``, in the order the layers ran (Flax records
    collections in call order; `jax.tree_util` would sort the keys instead).
    """
    out: dict[str, tuple[Array, Array]] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if key == "moments":
                out[prefix] = value[0]
            else:
                walk(value, f"{prefix}/{key}" if prefix else key)

    walk(state.get(BN_STATS, {}), "")
    return out
