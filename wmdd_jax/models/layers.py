"""Building blocks shared by the models: convolutions (lax, im2col, Winograd) and pooling.

Every layer computes in NHWC. Parameters follow Flax's ``nn.Conv`` layout (kernel
``[kh, kw, in, out]``) so that a checkpoint is the same whichever convolution
implementation runs it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


# How fresh weights are drawn (a model's ``weight_init``, config ``train_spec``): "torch", PyTorch's
# defaults (what the official WMDD code trains with), or "kaiming", what this toolkit drew before it
# had the option (kaiming-normal convolutions, zero biases, Flax's LeCun-normal dense layers).
WEIGHT_INITS = ("torch", "kaiming")


def check_weight_init(weight_init: str) -> str:
    """``weight_init`` if it is one of `WEIGHT_INITS`, else a ValueError that lists them."""
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
    return weight_init


def torch_uniform(fan_in: int) -> Any:
    """PyTorch's default initializer of ``nn.Conv2d`` and ``nn.Linear`` weights *and* biases:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), ``fan_in`` = inputs per output (``kh * kw * c_in`` for a
    convolution). (Its weights' ``kaiming_uniform_(a=sqrt(5))`` has this bound.)"""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_layer_inits(fan_in: int) -> dict:
    """``kernel_init`` and ``bias_init`` of a `Conv` or ``nn.Dense`` as PyTorch's layers default them."""
    return dict(kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in))


def torch_kaiming_fan_out() -> Any:
    """torchvision's ResNet convolutions: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``,
    N(0, 2 / (kh * kw * c_out)), not truncated."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_platform(platform: str = "auto") -> str:
    """The platform a model is built for: ``platform`` itself, or for ``"auto"`` jax's default backend.

    Stages pass the platform of the mesh they compile for (`wmdd_jax.sharding.mesh_platform`), so a
    program compiled on a CPU host for a TPU or GPU target takes that target's paths; ``"auto"`` is for
    models used directly, which run on the default backend's devices.
    """
    return jax.default_backend() if platform == "auto" else platform


def resolve_conv_impl(impl: str, platform: str = "auto") -> str:
    """Maps ``"auto"`` to the fast convolution for ``platform`` (`resolve_platform`).

    XLA's CPU convolution runs at about half PyTorch's speed on small images,
    while batched matrix products reach the CPU's matmul peak: ``"winograd"``
    (3x3 stride-1 kernels by Winograd F(4x4, 3x3), 4x fewer multiplies than
    im2col; other kernels fall back to im2col) is the CPU default. On GPU and
    TPU ``lax.conv`` is the fast path.
    """
    if impl == "auto":
        return "winograd" if resolve_platform(platform) == "cpu" else "lax"
    if impl not in ("winograd", "im2col", "lax"):
        raise ValueError(
            f"conv_impl must be 'auto', 'winograd', 'im2col' or 'lax', got {impl!r}")
    return impl


def patches(x: Array, kh: int, kw: int, stride: int, padding: int) -> Array:
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


# Contractions of at most this many terms are computed as fused multiply-adds (`narrow_matmul`).
NARROW = 32


@jax.custom_vjp
def narrow_matmul(p: Array, k: Array) -> Array:
    """``p @ k`` over a short contraction (``t <= NARROW``) as ``t`` broadcast multiply-adds.

    ``p``: [..., t] with ``k`` [t, c] (one kernel), or [n, s, t] with ``k`` [n, t, c] (one per image).

    XLA's CPU matmul of a contraction this short (the first convolution of a 1- or 3-channel image,
    as patches) ran at under 10 GFLOP/s and wrote its whole output before the norm, ReLU and pooling
    read it back; as multiply-adds XLA fuses it into them and reads only the patches. Measured on a
    2-core CPU, best of interleaved rounds, batch 100: in the folded first-block norm of a ConvNet-3
    student (instance norm, online teacher) the training step went 212 -> 195 ms and predicting the
    10,000 test images 4.97 -> 4.47 s; in `im2col_conv`, the batch-norm teacher's forward 53 -> 46.5
    ms (the training step unchanged within its noise). The backward stays two matmuls: autodiff of
    the multiply-adds made the step 1.4x slower.
    """
    dtype = jnp.result_type(p, k)
    p, k = p.astype(jnp.promote_types(dtype, jnp.float32)), k.astype(jnp.promote_types(dtype, jnp.float32))
    if k.ndim == 3:
        y = sum(p[..., i, None] * k[:, None, i, :] for i in range(p.shape[-1]))
    else:
        y = sum(p[..., i, None] * k[i] for i in range(p.shape[-1]))
    return y.astype(dtype)  # summed in float32 under bfloat16 too


def _narrow_matmul_fwd(p, k):
    return narrow_matmul(p, k), (p, k)


def _narrow_matmul_bwd(res, g):
    p, k = res
    if k.ndim == 3:
        dp, dk = jnp.einsum("nsc,ntc->nst", g, k), jnp.einsum("nst,nsc->ntc", p, g)
    else:
        t, c = k.shape
        dp, dk = g @ k.T, p.reshape(-1, t).T @ g.reshape(-1, c)
    return dp.astype(p.dtype), dk.astype(k.dtype)


narrow_matmul.defvjp(_narrow_matmul_fwd, _narrow_matmul_bwd)


def im2col_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """Convolution as one matmul over shifted slices (`narrow_matmul` for patches of <= NARROW values).

    Args:
      x: [n, h, w, c_in] input.
      kernel: [kh, kw, c_in, c_out].
    Returns:
      [n, h_out, w_out, c_out], identical (up to rounding) to
      ``lax.conv_general_dilated`` with symmetric ``padding`` and ``stride``.
    """
    kh, kw, cin, cout = kernel.shape
    p, k = patches(x, kh, kw, stride, padding), kernel.reshape(kh * kw * cin, cout)
    return narrow_matmul(p, k) if kh * kw * cin <= NARROW else jnp.dot(p, k)


# Winograd F(m x m, 3x3) (Lavin & Gray 2016): an m x m output tile of a 3x3 correlation is
# A^T [(G k G^T) * (B^T d B)] A for the (m+2) x (m+2) input tile d, so the 9 m^2 multiplies per tile
# and channel pair become (m+2)^2, done as (m+2)^2 matmuls [tiles, c_in] @ [c_in, c_out].
# m = 2 (points 0, +-1, inf): 2.25x fewer multiplies than direct convolution, transforms that only
# add and halve. m = 4 (points 0, +-1, +-2, inf): 4x fewer, and 2.25x (not 4x) the input's size in
# the transformed domain; its transforms scale by up to 8, so its float32 rounding is larger: 2.4e-6
# rms relative against 3.6e-7 for m = 2 and lax.conv on 16x16x128 maps (tests/test_layers.py
# bounds both against lax.conv, gradients included).
_WINOGRAD = {
    2: dict(
        BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        G=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        AT=((1, 1, 1, 0), (0, 1, -1, -1)),
    ),
    4: dict(
        BT=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        G=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    ),
}


def _combine(coefficients, terms):
    """sum_i coefficients[i] * terms[i], skipping zeros (the transforms are sparse, small integers)."""
    out = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        t = t if c == 1 else -t if c == -1 else c * t
        out = t if out is None else out + t
    return out


def _winograd_input(xp: Array, th: int, tw: int, m: int) -> Array:
    """Padded [n, m th + 2, m tw + 2, c] -> [(m+2)^2, n th tw, c], B^T d B of every input tile."""
    n, c = xp.shape[0], xp.shape[-1]
    bt = _WINOGRAD[m]["BT"]
    a = m + 2
    # Rows first, materialised as one [a, ...] array: XLA emits two simple fusions,
    # much faster than one fusion with a^2 outputs of a strided reads each.
    rows = [xp[:, i : i + m * th : m] for i in range(a)]
    rows = jnp.stack([_combine(b, rows) for b in bt])
    cols = [rows[:, :, :, j : j + m * tw : m] for j in range(a)]
    v = jnp.stack([_combine(b, cols) for b in bt], axis=1)
    return v.reshape(a * a, n * th * tw, c)


def _output_matrix(m: int, dtype) -> Array:
    """A^T (x) A^T: [m^2, (m+2)^2], the output transform of a tile as one matrix."""
    at = jnp.asarray(_WINOGRAD[m]["AT"], dtype)
    return jnp.einsum("ai,bj->abij", at, at).reshape(m * m, (m + 2) ** 2)


def _winograd_output(y: Array, n: int, th: int, tw: int, m: int) -> Array:
    """[(m+2)^2, n th tw, c] -> [n, m th, m tw, c], A^T y A of every tile.

    One matmul with the [m^2, (m+2)^2] transform: written as sums of slices, XLA's CPU fusions
    merged it into its consumers and recomputed its terms per element (for m = 4 a ConvNet-3
    training step measured 2x slower).
    """
    c = y.shape[-1]
    out = jnp.einsum("ot,tnc->onc", _output_matrix(m, y.dtype), y).reshape(m, m, n, th, tw, c)
    return out.transpose(2, 3, 0, 4, 1, 5).reshape(n, m * th, m * tw, c)


def _winograd_output_transpose(g: Array, th: int, tw: int, m: int) -> Array:
    """Adjoint of `_winograd_output`: [n, m th, m tw, c] -> [(m+2)^2, n th tw, c]."""
    n, c = g.shape[0], g.shape[-1]
    q = g.reshape(n, th, m, tw, m, c).transpose(2, 4, 0, 1, 3, 5).reshape(m * m, n * th * tw, c)
    return jnp.einsum("ot,onc->tnc", _output_matrix(m, g.dtype), q)


def _winograd_kernel(kernel: Array, m: int) -> Array:
    """[3, 3, c_in, c_out] -> [(m+2)^2, c_in, c_out], G k G^T."""
    g = jnp.asarray(_WINOGRAD[m]["G"], kernel.dtype)
    return jnp.einsum("ai,bj,ijcd->abcd", g, g, kernel).reshape((m + 2) ** 2, *kernel.shape[2:])


def _winograd_geometry(h: int, w: int, padding: int, m: int):
    h_out, w_out = h + 2 * padding - 2, w + 2 * padding - 2
    return h_out, w_out, -(-h_out // m), -(-w_out // m)


def winograd_tile(h: int, w: int, padding: int) -> int:
    """The output tile m of a 3x3 convolution: 4 (fewest multiplies), 2 for maps of 2 or fewer
    rows or columns, where a 4x4 tile would be mostly padding."""
    h_out, w_out = h + 2 * padding - 2, w + 2 * padding - 2
    return 4 if min(h_out, w_out) > 2 else 2


def _winograd_tiles(x: Array, padding: int, m: int) -> Array:
    n, h, w, c = x.shape
    _, _, th, tw = _winograd_geometry(h, w, padding, m)
    # Bottom/right padding completes the last tile (lax.pad accepts negative amounts).
    cfg = ((0, 0, 0), (padding, m * th + 2 - h - padding, 0), (padding, m * tw + 2 - w - padding, 0), (0, 0, 0))
    return _winograd_input(jax.lax.pad(x, jnp.zeros((), x.dtype), cfg), th, tw, m)


def _winograd_apply(x: Array, u: Array, padding: int, m: int) -> tuple[Array, Array]:
    n, h, w, _ = x.shape
    h_out, w_out, th, tw = _winograd_geometry(h, w, padding, m)
    v = _winograd_tiles(x, padding, m)
    y = jnp.einsum("tnc,tcd->tnd", v, u)
    return _winograd_output(y, n, th, tw, m)[:, :h_out, :w_out], v


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def winograd_conv(x: Array, kernel: Array, padding: int = 1, tile: int | None = None) -> Array:
    """3x3 stride-1 convolution by Winograd F(m x m, 3x3).

    Args:
      x: [n, h, w, c_in] input.
      kernel: [3, 3, c_in, c_out].
      padding: symmetric zero padding, 0, 1 or 2.
      tile: the output tile m, 2 or 4; None: `winograd_tile`.
    Returns:
      [n, h + 2 padding - 2, w + 2 padding - 2, c_out], equal to
      ``lax.conv_general_dilated`` up to float32 rounding.
    """
    return _winograd_conv_fwd(x, kernel, padding, tile)[0]


def _winograd_conv_fwd(x, kernel, padding, tile):
    m = tile or winograd_tile(x.shape[1], x.shape[2], padding)
    y, v = _winograd_apply(x, _winograd_kernel(kernel, m), padding, m)
    return y, (v, kernel)


def _winograd_conv_bwd(padding, tile, res, g):
    v, kernel = res
    n, h_out, w_out, _ = g.shape
    m = tile or winograd_tile(h_out + 2 - 2 * padding, w_out + 2 - 2 * padding, padding)
    th, tw = -(-h_out // m), -(-w_out // m)
    # Kernel gradient in the Winograd domain: reuses the saved input tiles.
    gp = jnp.pad(g, ((0, 0), (0, m * th - h_out), (0, m * tw - w_out), (0, 0)))
    du = jnp.einsum("tnc,tnd->tcd", v, _winograd_output_transpose(gp, th, tw, m))
    gt = jnp.asarray(_WINOGRAD[m]["G"], kernel.dtype)
    dkernel = jnp.einsum("ai,bj,abcd->ijcd", gt, gt, du.reshape(m + 2, m + 2, *du.shape[1:]))
    # Input gradient: the full correlation of g with the flipped, transposed
    # kernel, itself a 3x3 stride-1 convolution (no scatter of 9 slices).
    kflip = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = winograd_conv(g, kflip, 2 - padding, tile)
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
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, weights_only: bool = False):
        """The convolution of ``x``; with ``weights_only`` its (kernel, bias or None) for ``x``'s
        channels instead (a norm that folds the convolution in applies them itself)."""
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        kernel = kernel.astype(x.dtype)
        if weights_only:
            bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
            return kernel, bias
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
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
        return y


def folds_into_norm(conv: Conv, channels: int) -> bool:
    """Whether the norm after ``conv`` computes both (`wmdd_jax.models.norms.conv_instance_norm`,
    ``conv_batch_norm``) for ``channels``-channel inputs: a CPU choice (the ``im2col`` / ``winograd``
    implementations) for narrow patches (the first layer of a 1- or 3-channel image), where it saves
    passes over the widest activation of the network."""
    return resolve_conv_impl(conv.conv_impl) != "lax" and conv.kernel_size ** 2 * channels <= NARROW


def avg_pool2(x: Array) -> Array:
    """2x2 average pooling, stride 2, dropping an odd last row/column like PyTorch."""
    # Four strided slices, not a reshape and mean: XLA's CPU fusions then read the map (and the
    # norm and ReLU fused into it) once. A ConvNet-3 training step with an online teacher ran 18%
    # faster (best of 6 interleaved rounds: 173 vs 210 ms at batch 100), the teacher's forward 25%.
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return (x[:, 0:h:2, 0:w:2] + x[:, 1:h:2, 0:w:2] + x[:, 0:h:2, 1:w:2] + x[:, 1:h:2, 1:w:2]) * 0.25
