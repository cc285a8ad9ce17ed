"""Normalisation layers (instance norm, BatchNorm that reports its input's moments) and the exact
pooled statistics that WMDD's BN-matching term is built from."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmdd_jax.models.layers import narrow_matmul, patches, resolve_platform

Array = jax.Array

# The collection BatchNorm layers sow their input moments into (see `BatchNorm`).
BN_STATS = "bn_stats"


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
    def __call__(self, x: Array, conv: tuple[Array, int, int] | None = None) -> Array:
        """The norm of ``x``; with ``conv = (kernel, stride, padding)`` the norm of that convolution
        of ``x`` (`conv_instance_norm`: equal, without the convolution's output in memory)."""
        c = x.shape[-1] if conv is None else conv[0].shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        if conv is not None:
            return conv_instance_norm(x, *conv, scale, bias, self.epsilon)
        dtype = x.dtype
        x = x.astype(jnp.promote_types(dtype, jnp.float32))  # statistics in float32 (bfloat16 compute too)
        mean = x.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(dtype)


def conv_instance_norm(x: Array, kernel: Array, stride: int, padding: int, scale: Array, bias: Array,
                       epsilon: float = 1e-5) -> Array:
    """``InstanceNorm(conv(x))`` for a convolution over few input values per output (a first layer).

    A convolution's output at one position is ``patch . kernel``, so over an image's positions its
    per-channel variance is ``k_c^T S k_c`` with ``S`` the image's (biased) patch covariance,
    ``kh*kw*c_in`` square, and its mean ``mu . k_c + b_c``. The normalised output is then one
    product (`narrow_matmul`) of the centred patches with a per-image kernel
    ``k_c * scale_c / sqrt(var_c + eps)``, plus ``bias``: the convolution's output and the
    normalisation's passes over it (the widest activation of a ConvNet, 128 channels at full
    resolution) are never formed, which measured
    2.4-2.6x faster forward and backward on a CPU. The convolution's bias drops out, as in the
    unfused form (the norm removes any per-channel constant): its gradient is exactly 0.

    Args:
      x: [n, h, w, c_in] input; kernel: [kh, kw, c_in, c_out]; scale, bias: [c_out].
    Returns:
      [n, h_out, w_out, c_out], equal to ``InstanceNorm`` of the convolution up to float rounding.
    """
    return _folded_norm(x, kernel, stride, padding, scale, bias, epsilon, per_image=True)[0]


def conv_batch_norm(x: Array, kernel: Array, conv_bias: Array | None, stride: int, padding: int, scale: Array,
                    bias: Array, epsilon: float = 1e-5) -> tuple[Array, Array, Array]:
    """``BatchNorm`` (training mode) of a convolution over few input values per output, as
    `conv_instance_norm` computes instance norm: the statistics come from the batch's patch
    covariance, the output from one product of the centred patches with the folded kernel.

    Returns:
      (output [n, h_out, w_out, c_out], batch mean [c_out], biased batch variance [c_out]) of the
      convolution's output (its bias included in the mean), as the unfused layers compute them.
    """
    y, mean, var = _folded_norm(x, kernel, stride, padding, scale, bias, epsilon, per_image=False)
    return y, mean[0] + (0.0 if conv_bias is None else conv_bias.astype(mean.dtype)), var[0]


def _folded_norm(x, kernel, stride, padding, scale, bias, epsilon, per_image: bool):
    """The normalised convolution of ``x`` with statistics per image or over the whole batch.

    Returns (output, mean [n or 1, c_out] of the bias-free convolution, its biased variance, alike).
    """
    dtype = x.dtype
    kh, kw, cin, cout = kernel.shape
    p = patches(x.astype(jnp.promote_types(dtype, jnp.float32)), kh, kw, stride, padding)
    n, h, w, t = p.shape
    p, k = p.reshape(n, h * w, t), kernel.reshape(t, cout).astype(p.dtype)
    axes = (1,) if per_image else (0, 1)
    mu = p.mean(axis=axes, keepdims=True)                                 # [n or 1, 1, t]
    p = p - mu
    cov = jnp.einsum("npt,nps->nts", p, p)
    cov = cov / (h * w) if per_image else cov.sum(0, keepdims=True) / (n * h * w)
    var = jnp.einsum("tc,nts,sc->nc", k, cov, k)
    folded = k[None] * (jax.lax.rsqrt(var + epsilon) * scale.astype(p.dtype))[:, None, :]
    # Batch statistics: one kernel for every image (narrow_matmul's backward then contracts over all
    # pixels at once; a per-image product measured the same, 70-71 ms for a batch of 256 forward and
    # backward).
    y = narrow_matmul(p, folded if per_image else folded[0]).astype(dtype) + bias.astype(dtype)
    return y.reshape(n, h, w, cout), mu[:, 0] @ k, var


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
    platform: str = "auto"  # the target's platform (`resolve_platform`): "cpu" takes the hand-written backward

    @nn.compact
    def __call__(self, x: Array, conv: tuple[Array, Array | None, int, int] | None = None) -> Array:
        """The norm of ``x``; in training mode, with ``conv = (kernel, bias, stride, padding)``, the norm
        of that convolution of ``x`` (`conv_batch_norm`: equal, without the convolution's output)."""
        c = x.shape[-1] if conv is None else conv[0].shape[-1]
        dtype = x.dtype
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        if conv is not None:
            if self.use_running_average or self.is_mutable_collection(BN_STATS):
                raise ValueError("a convolution folds into BatchNorm only in training mode, without bn_stats")
            y, mean, var = conv_batch_norm(x, *conv, scale, bias, self.epsilon)
            # Output positions per channel, as the unfused layer counts them (for the unbiased variance).
            self._update_running(ra_mean, ra_var, mean, var, y.size // c)
            return y

        x = x.astype(jnp.promote_types(dtype, jnp.float32))  # statistics in float32 (bfloat16 compute too)
        reduce_axes = tuple(range(x.ndim - 1))
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
        normalize = _normalize if resolve_platform(self.platform) == "cpu" else _normalize_autodiff
        y, mean, var = normalize(x, scale, bias, reduce_axes, self.epsilon)
        self._update_running(ra_mean, ra_var, mean.reshape(c), var.reshape(c), x.size // c)
        return y.astype(dtype)

    def _update_running(self, ra_mean, ra_var, mean: Array, var: Array, n: int) -> None:
        """PyTorch's update of the running statistics: the unbiased batch variance (``n`` values)."""
        if not self.is_initializing():
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased


def make_norm(kind: str, train: bool, name: str, platform: str = "auto") -> nn.Module | None:
    if kind == "instance":
        return InstanceNorm(name=name)
    if kind == "batch":
        return BatchNorm(use_running_average=not train, platform=platform, name=name)
    if kind == "none":
        return None
    raise ValueError(f"norm must be 'instance', 'batch' or 'none', got {kind!r}")


def pooled_moments(
    mean: Array, var: Array, segment_ids: Array | None = None, num_segments: int = 1,
    weights: Array | None = None, axis_names=None,
) -> tuple[Array, Array]:
    """Exact mean and biased variance of a group of samples from per-sample moments.

    Uses the law of total variance: var = E[var_i] + Var[mean_i], which stays
    accurate in float32 where E[x^2] - E[x]^2 would not.

    Args:
      mean, var: [n, c] per-sample spatial mean and variance (from `BatchNorm`).
      segment_ids: optional [n] int group of each sample (e.g. its class).
      num_segments: number of groups when ``segment_ids`` is given.
      weights: optional [n] sample weights (0 drops a sample, e.g. padding).
      axis_names: inside ``shard_map``, mesh axes whose devices hold other samples of the groups
        (their sums are added across them).
    Returns:
      ([c], [c]) without segments, else ([num_segments, c], [num_segments, c]).
    """
    w = jnp.ones(mean.shape[:1], mean.dtype) if weights is None else weights.astype(mean.dtype)
    if segment_ids is None:
        segment_ids = jnp.zeros(mean.shape[:1], jnp.int32)
        squeeze, num_segments = True, 1
    else:
        squeeze = False
    def seg_sum(a):
        sums = jax.ops.segment_sum(a, segment_ids, num_segments)
        return sums if axis_names is None else jax.lax.psum(sums, axis_names)

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
