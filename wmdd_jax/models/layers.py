"""Building blocks shared by the models: convolutions (lax, im2col, Winograd) and pooling.

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


def avg_pool2(x: Array) -> Array:
    """2x2 average pooling, stride 2, dropping an odd last row/column like PyTorch."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
