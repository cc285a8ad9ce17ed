"""Building blocks shared by the models: convolution, normalisation, pooling.

Every layer computes in NHWC. Parameters follow Flax's ``nn.Conv`` layout (kernel
``[kh, kw, in, out]``) so that a checkpoint is the same whichever convolution
implementation runs it.
"""

from __future__ import annotations

import functools
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
    while batched matrix products reach the CPU's matmul peak: ``"winograd"``
    (3x3 stride-1 kernels, 2.25x fewer multiplies than im2col; other kernels
    fall back to im2col) is the CPU default. On GPU and TPU ``lax.conv`` is the
    fast path.
    """
    if impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "lax"
    if impl not in ("winograd", "im2col", "lax"):
        raise ValueError(
            f"conv_impl must be 'auto', 'winograd', 'im2col' or 'lax', got {impl!r}")
    return impl


def _patches(x: Array, kh: int, kw: int, stride: int, padding: int) -> Array:
    """[n, h, w, c] -> [n, h_out, w_out, kh * kw * c], channel order (i, j, c)."""
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h_out = (x.shape[1] - kh) // stride + 1
    w_out = (x.shape[2] - kw) // stride + 1
    cols = [
        x[:, i : i + (h_out - 1) * stride + 1 : stride, j : j + (w_out - 1) * stride + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


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
    return jnp.dot(_patches(x, kh, kw, stride, padding), kernel.reshape(kh * kw * cin, cout))


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 2x2 output tile of a 3x3
# correlation is A^T [(G k G^T) * (B^T d B)] A for the 4x4 input tile d, so the
# 36 multiplies per tile and channel pair become 16, done as 16 matmuls
# [tiles, c_in] @ [c_in, c_out]. The transforms only add and halve, so the
# result matches direct convolution to float32 rounding (~1e-6 relative).
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _bt_rows(r):
    """B^T applied along a list of 4 slices: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)."""
    return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]


def _winograd_input(xp: Array, th: int, tw: int) -> Array:
    """Padded [n, 2th+2, 2tw+2, c] -> [16, n*th*tw, c], B^T d B of every 4x4 tile."""
    n, c = xp.shape[0], xp.shape[-1]
    # Rows first, materialised as one [4, ...] array: XLA emits two simple
    # fusions, much faster than one fusion with 16 outputs of 4 strided reads each.
    rows = jnp.stack(_bt_rows([xp[:, i : i + 2 * th : 2] for i in range(4)]))
    v = jnp.stack(_bt_rows([rows[:, :, :, j : j + 2 * tw : 2] for j in range(4)]), axis=1)
    return v.reshape(16, n * th * tw, c)


def _winograd_output(m: Array, n: int, th: int, tw: int) -> Array:
    """[16, n*th*tw, c] -> [n, 2th, 2tw, c], A^T m A of every tile."""
    c = m.shape[-1]
    m = m.reshape(4, 4, n, th, tw, c)
    rows = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
    y = jnp.stack([jnp.stack([t[0] + t[1] + t[2], t[1] - t[2] - t[3]]) for t in rows])
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, c)


def _winograd_output_transpose(g: Array, th: int, tw: int) -> Array:
    """Adjoint of `_winograd_output`: [n, 2th, 2tw, c] -> [16, n*th*tw, c]."""
    n, c = g.shape[0], g.shape[-1]
    q = [[g[:, i::2, j::2] for j in range(2)] for i in range(2)]
    # Columns of A^T: (1, 0), (1, 1), (1, -1), (0, -1).
    at = lambda a, b: [a, a + b, a - b, -b]  # noqa: E731
    rows = [at(q[0][j], q[1][j]) for j in range(2)]  # rows[j][r]
    out = [v for r in range(4) for v in at(rows[0][r], rows[1][r])]
    return jnp.stack(out).reshape(16, n * th * tw, c)


def _winograd_kernel(kernel: Array) -> Array:
    """[3, 3, c_in, c_out] -> [16, c_in, c_out], G k G^T."""
    g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
    return jnp.einsum("ai,bj,ijcd->abcd", g, g, kernel).reshape(16, *kernel.shape[2:])


def _winograd_geometry(h: int, w: int, padding: int):
    h_out, w_out = h + 2 * padding - 2, w + 2 * padding - 2
    return h_out, w_out, -(-h_out // 2), -(-w_out // 2)


def _winograd_tiles(x: Array, padding: int) -> Array:
    n, h, w, c = x.shape
    _, _, th, tw = _winograd_geometry(h, w, padding)
    # Bottom/right padding completes the last tile (lax.pad accepts negative amounts).
    cfg = ((0, 0, 0), (padding, 2 * th + 2 - h - padding, 0), (padding, 2 * tw + 2 - w - padding, 0), (0, 0, 0))
    return _winograd_input(jax.lax.pad(x, jnp.zeros((), x.dtype), cfg), th, tw)


def _winograd_apply(x: Array, u: Array, padding: int) -> tuple[Array, Array]:
    n, h, w, _ = x.shape
    h_out, w_out, th, tw = _winograd_geometry(h, w, padding)
    v = _winograd_tiles(x, padding)
    m = jnp.einsum("tnc,tcd->tnd", v, u)
    return _winograd_output(m, n, th, tw)[:, :h_out, :w_out], v


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv(x: Array, kernel: Array, padding: int = 1) -> Array:
    """3x3 stride-1 convolution by Winograd F(2x2, 3x3).

    Args:
      x: [n, h, w, c_in] input.
      kernel: [3, 3, c_in, c_out].
      padding: symmetric zero padding, 0, 1 or 2.
    Returns:
      [n, h + 2 padding - 2, w + 2 padding - 2, c_out], equal to
      ``lax.conv_general_dilated`` up to float32 rounding.
    """
    return _winograd_apply(x, _winograd_kernel(kernel), padding)[0]


def _winograd_conv_fwd(x, kernel, padding):
    y, v = _winograd_apply(x, _winograd_kernel(kernel), padding)
    return y, (v, kernel)


def _winograd_conv_bwd(padding, res, g):
    v, kernel = res
    n, h_out, w_out, _ = g.shape
    th, tw = -(-h_out // 2), -(-w_out // 2)
    # Kernel gradient in the Winograd domain: reuses the saved input tiles.
    gp = jnp.pad(g, ((0, 0), (0, 2 * th - h_out), (0, 2 * tw - w_out), (0, 0)))
    du = jnp.einsum("tnc,tnd->tcd", v, _winograd_output_transpose(gp, th, tw))
    gt = jnp.asarray(_WINOGRAD_G, kernel.dtype)
    dkernel = jnp.einsum("ai,bj,abcd->ijcd", gt, gt, du.reshape(4, 4, *du.shape[1:]))
    # Input gradient: the full correlation of g with the flipped, transposed
    # kernel, itself a 3x3 stride-1 convolution (no scatter of 9 slices).
    kflip = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = _winograd_apply(g, _winograd_kernel(kflip), 2 - padding)[0]
    return dx, dkernel


winograd_conv.defvjp(_winograd_conv_fwd, _winograd_conv_bwd)


def _use_winograd(kernel_size: int, stride: int, padding: int, cin: int) -> bool:
    # With one or two input channels the 16 matmuls are too thin to pay for the transforms.
    return kernel_size == 3 and stride == 1 and padding in (0, 1, 2) and cin >= 8


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
        impl = resolve_conv_impl(self.conv_impl)
        if impl == "winograd" and _use_winograd(k, self.stride, self.padding, x.shape[-1]):
            y = winograd_conv(x, kernel, self.padding)
        elif impl in ("winograd", "im2col"):
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x: Array, scale: Array, bias: Array, axes: tuple[int, ...], epsilon: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over ``axes``; also returns (mean, var).

    The hand-written backward needs two reductions (sum g, sum g * x) and one
    elementwise pass, where autodiff materialises several full-size temporaries.
    Measured faster for batch norm; for instance norm XLA fuses the autodiff
    backward with its neighbours better, so `InstanceNorm` does not use it.
    """
    return _normalize_fwd(x, scale, bias, axes, epsilon)[0]


def _normalize_fwd(x, scale, bias, axes, epsilon):
    mean = x.mean(axis=axes, keepdims=True)
    var = jnp.square(x - mean).mean(axis=axes, keepdims=True)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _normalize_bwd(axes, epsilon, res, cotangents):
    x, mean, rstd, scale = res
    g, dmean, dvar = cotangents
    count = 1
    for a in axes:
        count *= x.shape[a]
    param_axes = tuple(range(x.ndim - 1))
    sg = g.sum(axis=axes, keepdims=True)
    sgx = (g * x).sum(axis=axes, keepdims=True)
    sgxhat = rstd * (sgx - mean * sg)  # sum of g * xhat
    dbias = sg.sum(axis=param_axes)
    dscale = sgxhat.sum(axis=param_axes)
    a = rstd * scale
    # dx = a (g - mean(g) - xhat mean(g xhat)) + dmean / N + dvar 2 (x - mean) / N,
    # expanded in x so that one elementwise pass writes it.
    c1 = a * rstd * sgxhat / count - 2.0 * dvar / count
    c0 = -a * sg / count + dmean / count + c1 * mean
    dx = a * g - c1 * x + c0
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _normalize_autodiff(x, scale, bias, axes, epsilon):
    """`_normalize` with JAX's own backward (off CPU)."""
    return _normalize_fwd(x, scale, bias, axes, epsilon)[0]


class InstanceNorm(nn.Module):
    """Per-sample, per-channel normalisation with affine parameters.

    Equal to PyTorch's ``nn.GroupNorm(C, C)``, the instance norm of the
    dataset-distillation ConvNet.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, dtype = x.shape[-1], x.dtype
        x = x.astype(jnp.promote_types(dtype, jnp.float32))  # statistics in float32 (bfloat16 compute too)
        mean = x.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return (y * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(dtype)


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
        c, dtype = x.shape[-1], x.dtype
        x = x.astype(jnp.promote_types(dtype, jnp.float32))  # statistics in float32 (bfloat16 compute too)
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

        scale, bias = scale.astype(x.dtype), bias.astype(x.dtype)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
            return (y * scale + bias).astype(dtype)
        # The hand-written backward is a CPU choice, like the Winograd convolution: measured there;
        # on GPU and TPU XLA's fusion of the autodiff backward is the known-good path.
        normalize = _normalize if jax.default_backend() == "cpu" else _normalize_autodiff
        y, mean, var = normalize(x, scale, bias, reduce_axes, self.epsilon)
        if not self.is_initializing():
            mean, var = mean.reshape(c), var.reshape(c)
            n = x.size // c
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y.astype(dtype)


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
