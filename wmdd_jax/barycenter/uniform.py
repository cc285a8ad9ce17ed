"""Uniform weights: the annealed, warm-started Sinkhorn fixed point ``b_j <- sum_i P_ij x_i / sum_i P_ij``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.barycenter.ott_compat import _pvary, _Sinkhorn, _varying_axes

with warnings.catch_warnings():
    # `import ott` pulls in jaxopt, which raises a DeprecationWarning on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from ott.geometry import geometry, pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import acceleration


def _epsilon_schedule(num_steps, anneal_steps, eps_start, eps_end, dtype):
    """``[num_steps]`` epsilons: geometric from ``eps_start`` to ``eps_end`` over ``anneal_steps``
    steps, then constant (the polishing steps)."""
    t = np.minimum(np.arange(num_steps) / max(anneal_steps - 1, 1), 1.0)
    return jnp.asarray(eps_start * (eps_end / eps_start) ** t, dtype)


def _uniform_barycenter(x, a, support, *, epsilons, anneal_steps, tol, sinkhorn_threshold,
                        polish_threshold, sinkhorn_chunk, sinkhorn_max_iterations,
                        sinkhorn_momentum, inner_iterations):
    """The fixed point ``b_j <- sum_i P_ij x_i / sum_i P_ij``, in normalised units.

    One loop of *rounds*: each round runs at most ``sinkhorn_chunk`` warm-started Sinkhorn
    iterations at the current step's epsilon; a step (projection, next epsilon) is taken only once
    the plan has converged (or the step's ``sinkhorn_max_iterations`` are spent). Projecting from
    unconverged plans derails the fixed point, and waiting inside one long Sinkhorn call per step
    would make a ``vmap``-ed batch of classes wait, at every step, for its slowest class; in rounds,
    each class moves on at its own pace and the batch costs about its slowest class overall.

    Args:
        x: ``[n, d]`` points (unit variance). a: ``[n]`` weights summing to 1.
        support: ``[m, d]`` initial support.
        epsilons: ``[T]`` the epsilon of each outer step.

    Returns:
        ``(support [m, d], cost [], num_iterations [], converged [])``; ``cost`` is that of the last
        plan, rounded onto the marginals, at the returned support (see :func:`_rounded_cost`).
    """
    m = support.shape[0]
    dtype = x.dtype
    w = jnp.full((m,), 1.0 / m, dtype)
    f0 = jnp.zeros((m,), dtype)
    g0 = jnp.where(a > 0, 0.0, -jnp.inf).astype(dtype)  # OTT's convention for zero weights
    rounds_per_step = -(-sinkhorn_max_iterations // sinkhorn_chunk)
    max_rounds = epsilons.shape[0] * rounds_per_step

    def solver(threshold):
        # Fixed over-relaxation (Thibault et al. 2021): 5-10x fewer iterations at small epsilon
        # than plain Sinkhorn here. Fixed, not OTT's adaptive rule, which branches on a constant.
        return _Sinkhorn(threshold=threshold, max_iterations=sinkhorn_chunk,
                         inner_iterations=inner_iterations,
                         momentum=acceleration.Momentum(value=sinkhorn_momentum))

    def one_round(state):
        r, t, spent, support, f, g, last_plan, shift, _ = state
        # A dense Geometry holding the PointCloud's cost: given the PointCloud itself, XLA
        # recomputes the [m, n] cost (an m*n*d matmul) in Sinkhorn's error branch.
        cost_matrix = pointcloud.PointCloud(support, x).cost_matrix
        geom = geometry.Geometry(cost_matrix=cost_matrix, epsilon=epsilons[t])
        # Loose solves while annealing (each plan is one step on the path), tight ones at the
        # final epsilon (they fix the returned support). The threshold is a traced leaf of the
        # solver pytree, so both phases share one compiled loop.
        threshold = jnp.where(t < anneal_steps, sinkhorn_threshold, polish_threshold).astype(dtype)
        out = solver(threshold)(linear_problem.LinearProblem(geom, a=w, b=a), init=(f, g))
        plan = out.matrix  # [m, n]
        mass = jnp.sum(plan, axis=1)
        new = (plan @ x) / jnp.where(mass > 0, mass, 1.0)[:, None]
        new = jnp.where(mass[:, None] > 0, new, support)
        new_shift = jnp.mean(jnp.sum((new - support) ** 2, axis=-1))
        finite = jnp.logical_and(jnp.all(jnp.isfinite(mass)), jnp.isfinite(new_shift))
        # Take the step once the plan has converged or the step's budget is spent; if an
        # over-relaxed solve blew up, keep the support and restart the potentials cold.
        step = jnp.logical_and(finite, jnp.logical_or(out.converged, spent + 1 >= rounds_per_step))

        def pick(cond, new, old):
            return jnp.where(cond, new, old)

        return (r + 1, t + step, pick(step, 0, spent + 1), pick(step, new, support),
                pick(finite, out.f, f0), pick(finite, out.g, g0), pick(step, plan, last_plan),
                pick(step, new_shift, shift), jnp.logical_and(finite, out.converged))

    def keep_going(state):
        r, t, shift = state[0], state[1], state[7]
        # Always finish the annealing; then stop once the support has settled.
        moving = jnp.logical_or(t < anneal_steps, shift > tol)
        return jnp.logical_and(jnp.logical_and(r < max_rounds, t < epsilons.shape[0]), moving)

    zero, inf = jnp.array(0, jnp.int32), jnp.array(jnp.inf, dtype)
    plan0 = w[:, None] * a[None, :]  # the independent coupling, until a step is taken
    init = (zero, zero, zero, support, f0, g0, plan0, inf, jnp.array(False))
    init = _pvary(init, _varying_axes((x, a, support)))
    _, t, _, support, _, _, plan, shift, solved = jax.lax.while_loop(keep_going, one_round, init)
    cost = _rounded_cost(plan, w, a, pointcloud.PointCloud(support, x).cost_matrix)
    return support, cost, t, jnp.logical_and(shift <= tol, solved)


def _rounded_cost(plan, w, a, cost_matrix):
    """``<P', C>`` for ``P'`` the plan ``[m, n]`` rounded onto the marginals ``(w, a)``.

    Sinkhorn's plan matches its marginals only up to the threshold, so ``<P, C>`` may fall below
    the exact OT cost. The rounding of Altschuler, Weed & Rigollet (2017) scales rows and columns
    down to at most their target mass and adds the missing mass as a rank-one coupling; ``P'`` is
    then feasible, so ``<P', C>`` is an upper bound of the exact cost (and within the Sinkhorn
    error of ``<P, C>``).
    """
    rows = jnp.sum(plan, axis=1)
    plan = plan * jnp.minimum(w / jnp.where(rows > 0, rows, 1.0), 1.0)[:, None]
    cols = jnp.sum(plan, axis=0)
    plan = plan * jnp.minimum(a / jnp.where(cols > 0, cols, 1.0), 1.0)[None, :]
    err_w = jnp.maximum(w - jnp.sum(plan, axis=1), 0.0)
    err_a = jnp.maximum(a - jnp.sum(plan, axis=0), 0.0)
    missing = jnp.sum(err_w)
    extra = err_w @ cost_matrix @ err_a / jnp.where(missing > 0, missing, 1.0)
    return jnp.sum(plan * cost_matrix) + extra
