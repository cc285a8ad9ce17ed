"""Weighted point clouds: the dtype we compute in, input checks, normalisation, distances."""

import jax
import jax.numpy as jnp
import numpy as np


def _float_dtype(x) -> jnp.dtype:
    """The dtype we compute in: the input's float dtype, but at least float32.

    float16 and bfloat16 overflow in squared distances (a feature at 100 squares to 1e4, a sum of
    512 of them to 5e6 > 65504) and round Sinkhorn's potentials far too coarsely, so they are
    computed (and returned) in float32. Integer inputs get the default float dtype.
    """
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.promote_types(x.dtype, jnp.float32)
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _is_concrete(*values) -> bool:
    """True when no value is a tracer, i.e. their contents can be read (an eager call)."""
    return not any(isinstance(v, jax.core.Tracer) for v in values)


def _check_cloud(name: str, points, weights, weights_name: str) -> None:
    """Raise ``ValueError`` unless ``points`` is ``[n, d]`` and ``weights`` ``[n]`` (or ``None``);
    when the values are concrete, also unless the weights are finite, non-negative with a positive
    sum and the points of positive weight are finite. Shapes are static, so they are checked under
    ``jit`` too; values only in eager calls (under ``jit`` see :func:`_invalid`)."""
    if points.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n, d] array of n points in d dimensions; got shape "
                         f"{tuple(points.shape)}. For n scalar points pass {name}[:, None].")
    n = points.shape[0]
    if n == 0 or points.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one point of at least one coordinate; got shape "
                         f"{tuple(points.shape)}.")
    if weights is not None and tuple(weights.shape) != (n,):
        raise ValueError(f"{weights_name} must be a [n] array, one weight per row of {name} (n = {n}); "
                         f"got shape {tuple(weights.shape)}.")
    if not _is_concrete(points, weights):
        return
    if weights is not None:
        w = jnp.asarray(weights)
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"{weights_name} contains NaN or inf; pass finite, non-negative weights "
                             "(0 marks a padding row).")
        if bool(jnp.any(w < 0)):
            raise ValueError(f"{weights_name} contains negative values; pass non-negative weights "
                             "(0 marks a padding row).")
        if not bool(jnp.sum(w) > 0):
            raise ValueError(f"{weights_name} sums to 0 (every row is padding); pass at least one "
                             "positive weight.")
        real = w > 0
    else:
        real = jnp.ones((n,), bool)
    finite = jnp.all(jnp.isfinite(points), axis=-1)
    if not bool(jnp.all(finite | ~real)):
        bad = int(jnp.argmin(finite | ~real))
        raise ValueError(f"{name} row {bad} (weight > 0) contains NaN or inf; pass finite points, or "
                         f"give such rows weight 0 in {weights_name} to mark them as padding.")


def _check_num_support(num_support) -> int:
    if isinstance(num_support, (bool, np.bool_)) or not isinstance(num_support, (int, np.integer)) \
            or num_support <= 0:
        raise ValueError(f"num_support must be a positive Python int (the number of support points, "
                         f"static under jit); got {num_support!r}.")
    return int(num_support)


def _invalid(points, weights) -> jax.Array:
    """``[]`` bool, traced: a weight is non-finite or negative, or a row of positive weight holds a
    non-finite value. Rows of weight 0 are padding and may hold anything."""
    finite_rows = jnp.all(jnp.isfinite(points), axis=-1)
    if weights is None:
        return jnp.logical_not(jnp.all(finite_rows))
    w = weights
    bad_w = jnp.logical_or(jnp.any(jnp.logical_not(jnp.isfinite(w))), jnp.any(w < 0))
    return jnp.logical_or(bad_w, jnp.any(jnp.logical_and(w > 0, jnp.logical_not(finite_rows))))


def _normalise(points, point_weights):
    """Centre and scale a weighted cloud to unit total variance.

    Returns ``(x [n, d], a [n], centre [d], scale [])``: ``x = (points - centre) / scale`` with
    ``sum_i a_i |x_i|^2 = 1`` (``scale = 1`` if the cloud is one location), ``a`` the weights
    normalised to sum 1. Padding rows (``a_i = 0``) are moved onto the centre, so whatever they
    held (garbage, 1e30, NaN) cannot overflow a cost. Invalid weights (negative, non-finite; see
    :func:`_invalid`, the caller reports them) are treated as an empty class: a cheap, finite run.
    """
    dtype = _float_dtype(points)
    points = points.astype(dtype)
    n = points.shape[0]
    if point_weights is None:
        a = jnp.full((n,), 1.0 / n, dtype)
    else:
        a = point_weights.astype(dtype)
        ok = jnp.logical_and(jnp.all(jnp.isfinite(a)), jnp.all(a >= 0))
        a = jnp.where(ok, a, 0.0)
        total = jnp.sum(a)
        # An all-padding (empty) class: uniform weights on points all at the origin (below), a
        # finite, meaningless row rather than NaNs in a batch.
        a = jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), 1.0 / n)
        empty = jnp.logical_not(total > 0)
    real = a > 0 if point_weights is None else jnp.logical_and(a > 0, jnp.logical_not(empty))
    real = jnp.logical_and(real, jnp.all(jnp.isfinite(points), axis=-1))
    centre = jnp.sum(jnp.where(real[:, None], a[:, None] * points, 0), axis=0)
    x = jnp.where(real[:, None], points - centre, 0)
    var = jnp.sum(a * jnp.sum(x * x, axis=-1))
    scale = jnp.where(var > 0, jnp.sqrt(var), 1.0).astype(dtype)
    return x / scale, a, centre, scale


def _sq_dists(x, y):
    """``[n, m]`` squared Euclidean distances of rows, clipped at 0 against float cancellation."""
    d2 = jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :] - 2.0 * x @ y.T
    return jnp.maximum(d2, 0.0)
