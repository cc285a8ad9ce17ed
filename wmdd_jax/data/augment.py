"""Jax-side augmentations, per image, usable inside ``jit`` and ``vmap``.

All take ``rng`` and images ``[n, h, w, c]`` and return the same shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def random_flip(rng: Array, images: Array) -> Array:
    """Mirrors each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def _crop_boxes(rng: Array, n: int, h: int, w: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[Array, Array, Array, Array]:
    """Random-resized-crop boxes (top, left, height, width), torchvision's sampling in one draw.

    torchvision retries up to 10 times for a box that fits; drawing the area and the
    log-ratio once and clipping the sides to the image is its vectorised equivalent
    up to the rare clipped boxes.
    """
    k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
    area = h * w * jax.random.uniform(k_area, (n,), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_ratio, (n,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    r = jnp.exp(log_r)
    bw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    bh = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    top = jax.random.uniform(k_y, (n,)) * (h - bh)
    left = jax.random.uniform(k_x, (n,)) * (w - bw)
    return top, left, bh, bw


def random_resized_crop(rng: Array, images: Array, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Array:
    """Crops a random box of each image and resizes it back to full size (bilinear)."""
    n, h, w, _ = images.shape
    top, left, bh, bw = _crop_boxes(rng, n, h, w, scale, ratio)

    def one(image, top, left, bh, bw):
        # scale_and_translate maps input coordinate u to output u * s + t.
        s = jnp.stack([h / bh, w / bw])
        t = -jnp.stack([top, left]) * s
        return jax.image.scale_and_translate(image, image.shape, (0, 1), s, t, method="linear", antialias=False)

    return jax.vmap(one)(images, top, left, bh, bw)


def random_shift(rng: Array, images: Array, pad: int) -> Array:
    """Pads by ``pad`` px (zeros) and crops back at a random offset: the classic 'random crop'."""
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)

    def one(image, off):
        return jax.lax.dynamic_slice(image, (off[0], off[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(one)(padded, offsets)


def cutmix(rng: Array, images: Array, prob: float = 1.0, beta: float = 1.0) -> Array:
    """CutMix of a batch (Yun et al. 2019), as SRe2L's relabel applies it: with probability ``prob``
    the batch gets one box, of area ``1 - lam`` with ``lam ~ Beta(beta, beta)`` and a uniform centre
    (clipped to the image), filled from a random permutation of the batch.

    Only the pixels are mixed: the targets come from a teacher run on the mixed images.
    """
    n, h, w, _ = images.shape
    k_apply, k_lam, k_y, k_x, k_perm = jax.random.split(rng, 5)
    lam = jax.random.beta(k_lam, beta, beta)
    cut = jnp.sqrt(1.0 - lam)
    cy, cx = jax.random.uniform(k_y) * h, jax.random.uniform(k_x) * w
    rows, cols = jnp.arange(h) + 0.5, jnp.arange(w) + 0.5
    in_rows = jnp.abs(rows - cy) < cut * h / 2
    in_cols = jnp.abs(cols - cx) < cut * w / 2
    box = in_rows[:, None] & in_cols[None, :] & jax.random.bernoulli(k_apply, prob)
    partner = images[jax.random.permutation(k_perm, n)]
    return jnp.where(box[None, :, :, None], partner, images)


def augment_batch(rng: Array, images: Array, *, flip: bool = False, crop_scale=None, shift: int = 0,
                  cutmix_prob: float = 0.0, cutmix_beta: float = 1.0) -> Array:
    """Applies the augmentations a config asks for, each with its own per-image draws.

    Args:
      images: [n, h, w, c] in any pixel space (flips and crops commute with normalisation;
        zero padding of ``shift`` pads with the value 0 of that space).
      flip: random horizontal flips.
      crop_scale: ``(lo, hi)`` area fraction for random-resized crop, or None.
      shift: padding in px of a random shift, 0 for none.
      cutmix_prob: probability that the batch gets `cutmix` (last, after the per-image ones); 0: off.
      cutmix_beta: its Beta(beta, beta) for the kept area.
    """
    k_crop, k_flip, k_shift = jax.random.split(rng, 3)
    if crop_scale is not None:
        images = random_resized_crop(k_crop, images, tuple(crop_scale))
    if shift:
        images = random_shift(k_shift, images, shift)
    if flip:
        images = random_flip(k_flip, images)
    if cutmix_prob > 0:
        images = cutmix(jax.random.fold_in(rng, 3), images, cutmix_prob, cutmix_beta)
    return images
