"""The squared 2-Wasserstein distance between two weighted clouds, by Sinkhorn."""

import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from wmdd_jax.barycenter.cloud import _check_cloud, _float_dtype, _invalid, _normalise
from wmdd_jax.barycenter.ott_compat import _Sinkhorn
from wmdd_jax.barycenter.precision import PrecisionLike, _matmul_precision
from wmdd_jax.barycenter.uniform import _rounded_cost

with warnings.catch_warnings():
    # `import ott` pulls in jaxopt, which raises a DeprecationWarning on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from ott.geometry import epsilon_scheduler, pointcloud
    from ott.problems.linear import linear_problem


def wasserstein2(
    x: jax.Array,
    a: Optional[jax.Array],
    y: jax.Array,
    b: Optional[jax.Array],
    *,
    epsilon: float = 1e-3,
    debiased: bool = False,
    threshold: float = 1e-4,
    max_iterations: int = 5000,
    precision: PrecisionLike = "highest",
) -> jax.Array:
    r"""Squared 2-Wasserstein distance between two weighted clouds, by Sinkhorn: ``[]``.

    Args:
        x: ``[n, d]``. a: ``[n]`` weights or ``None`` (uniform); zeros mark padding.
        y: ``[m, d]``. b: ``[m]`` weights or ``None``.
        epsilon: entropic regularisation relative to the total variance of the union of both
            clouds (each with mass 1/2). Sinkhorn starts at 100x this value and decays it
            (epsilon-scaling), so small values stay cheap.
        debiased: ``False`` (default): the transport cost :math:`\langle P', C\rangle` of the entropic
            plan rounded onto the marginals (see :func:`_rounded_cost`): an upper bound of
            :math:`W_2^2` that tends to it as :math:`\varepsilon \to 0` (within 0.01% in the
            tests). ``True``: the
            Sinkhorn divergence :math:`OT_\varepsilon(a,b) - \tfrac12 OT_\varepsilon(a,a) - \tfrac12
            OT_\varepsilon(b,b)` of the regularised costs, which is 0 for equal measures and smooth
            in the inputs (a loss), but less sharp.
        threshold: Sinkhorn's marginal error (L1) tolerance. max_iterations: its iteration limit.
        precision: the precision of every matmul this call traces (OTT's cost matrix, the rounded
            plan's cost): ``"highest"`` (default), ``"high"``, ``"default"`` or a
            ``jax.lax.Precision``, as in :func:`~wmdd_jax.barycenter.free_support_barycenter`.
            Static. Under ``jax.grad`` the backward pass of OTT's implicit differentiation is
            traced after this call returns, at the precision in force there: differentiate inside
            ``jax.default_matmul_precision("highest")`` to have it too.

    Returns:
        The estimate at the inputs' scale (float32 for float16/bfloat16 inputs).

    Raises:
        ValueError: ``x``/``y`` not ``[n, d]``/``[m, d]`` with the same ``d``, ``a``/``b`` not
            ``[n]``/``[m]``, ``precision`` none of the above; in eager calls also non-finite or
            negative weights, a zero sum, or NaN/inf points of positive weight. Under ``jit`` those
            values give NaN.
    """
    with _matmul_precision(precision):
        x, y = jnp.asarray(x), jnp.asarray(y)
        a = None if a is None else jnp.asarray(a)
        b = None if b is None else jnp.asarray(b)
        _check_cloud("x", x, a, "a")
        _check_cloud("y", y, b, "b")
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"x and y must have the same number of coordinates; got x {tuple(x.shape)}, "
                             f"y {tuple(y.shape)}. (y must be [m, {x.shape[1]}].)")
        invalid = jnp.logical_or(_invalid(x, a), _invalid(y, b))
        dtype = jnp.promote_types(_float_dtype(x), _float_dtype(y))
        a = jnp.full(x.shape[:1], 1.0 / x.shape[0], dtype) if a is None else jnp.asarray(a, dtype)
        b = jnp.full(y.shape[:1], 1.0 / y.shape[0], dtype) if b is None else jnp.asarray(b, dtype)
        a = jnp.where(invalid | (jnp.sum(a) <= 0), 1.0, jnp.where(jnp.isfinite(a), jnp.maximum(a, 0), 0))
        b = jnp.where(invalid | (jnp.sum(b) <= 0), 1.0, jnp.where(jnp.isfinite(b), jnp.maximum(b, 0), 0))
        a, b = a / jnp.sum(a), b / jnp.sum(b)
        nan = jnp.array(jnp.nan, dtype)
        z, _, _, scale = _normalise(jnp.concatenate([x, y]).astype(dtype), jnp.concatenate([a, b]) / 2)
        x, y = z[:x.shape[0]], z[x.shape[0]:]
        # Epsilon-scaling: start at 100x epsilon and decay 5% per iteration (the target is reached
        # after 90). min_iterations keeps the marginal error from stopping the solver earlier; it must
        # not be a multiple of inner_iterations (10), or OTT takes the skipped error (inf) it reads at
        # the first check after it for a divergence and stops.
        eps = epsilon_scheduler.Epsilon(epsilon, init=100.0, decay=0.95)
        solver = _Sinkhorn(threshold=threshold, max_iterations=max_iterations, min_iterations=95)

        def solve(p, pw, q, qw):
            return solver(linear_problem.LinearProblem(pointcloud.PointCloud(p, q, epsilon=eps), a=pw, b=qw))

        if not debiased:
            out = solve(x, a, y, b)
            return jnp.where(invalid, nan, _rounded_cost(out.matrix, a, b, out.geom.cost_matrix) * scale**2)
        cost = solve(x, a, y, b).reg_ot_cost
        cost -= 0.5 * (solve(x, a, x, a).reg_ot_cost + solve(y, b, y, b).reg_ot_cost)
        return jnp.where(invalid, nan, jnp.maximum(cost, 0.0) * scale**2)
