"""Learned weights: for fixed support the optimal weights send each point to its nearest support
point, so the joint problem is weighted k-means (Lloyd steps from k-means++ seedings, restarts)."""

import jax
import jax.numpy as jnp

from wmdd_jax.barycenter.cloud import _sq_dists
from wmdd_jax.barycenter.ott_compat import _pvary, _varying_axes
from wmdd_jax.barycenter.seeding import _kmeans_plus_plus, _restart_seed


def _lloyd(x, a, centres, *, max_iterations, tol):
    r"""Weighted Lloyd iterations from ``centres [k, d]``.

    Returns:
        ``(centres, mass [k], inertia [], num_iterations [], converged [])`` where ``mass`` is the
        weight of the points nearest each returned centre, so that ``inertia`` is exactly
        :math:`W_2^2(\nu, \sum_j \text{mass}_j \delta_{c_j})`. An empty cluster keeps its centre.
    """
    k = centres.shape[0]

    def assign(centres):
        return jnp.argmin(_sq_dists(x, centres), axis=1)

    def masses(labels):  # [n, k]
        return jax.nn.one_hot(labels, k, dtype=x.dtype) * a[:, None]

    def step(state):
        t, centres, labels, _ = state
        onehot = masses(labels)
        mass = jnp.sum(onehot, axis=0)
        new = (onehot.T @ x) / jnp.where(mass > 0, mass, 1.0)[:, None]
        new = jnp.where(mass[:, None] > 0, new, centres)
        new_labels = assign(new)
        shift = jnp.sum((new - centres) ** 2) / k
        # Done when the assignment stops changing (the centres are then fixed too).
        done = jnp.logical_or(jnp.all(new_labels == labels), shift <= tol)
        return t + 1, new, new_labels, done

    def keep_going(state):
        t, _, _, done = state
        return jnp.logical_and(t < max_iterations, jnp.logical_not(done))

    init = (jnp.array(0, jnp.int32), centres, assign(centres), jnp.array(False))
    init = _pvary(init, _varying_axes((x, a, centres)))
    t, centres, labels, done = jax.lax.while_loop(keep_going, step, init)
    mass = jnp.sum(masses(labels), axis=0)
    # Inertia from explicit differences, not |x|^2 + |c|^2 - 2xc: accurate for tight clusters.
    inertia = jnp.sum(a * jnp.sum((x - centres[labels]) ** 2, axis=-1))
    return centres, mass, inertia, t, done


def _split_duplicate_mass(centres, mass, atol):
    """Share each location's mass equally among the centres on it, if any centre is empty.

    Empty centres arise when a class has fewer distinct points than ``k``: the extra centres are
    copies that Lloyd leaves without points. An equal share keeps the measure (hence W2) the same
    and leaves no support point useless. ``atol``: squared distance that counts as the same place.
    """
    same = (_sq_dists(centres, centres) <= atol).astype(mass.dtype)  # [k, k]
    split = (same @ mass) / jnp.sum(same, axis=1)
    return jnp.where(jnp.any(mass == 0), split, mass)


def _weighted_kmeans(x, a, k, seed, *, init, n_init, max_iterations, tol):
    """The best (lowest inertia) of ``n_init`` seeded weighted k-means runs, or one from ``init``."""

    def run(restart):
        if init is None:
            centres = _kmeans_plus_plus(x, a, k, _restart_seed(seed, restart))
        else:
            centres = init
        return _lloyd(x, a, centres, max_iterations=max_iterations, tol=tol)

    outs = jax.vmap(run)(jnp.arange(1 if init is not None else n_init, dtype=jnp.uint32))
    centres, mass, inertia, t, done = jax.tree.map(lambda v: v[jnp.argmin(outs[2])], outs)
    weights = _split_duplicate_mass(centres, mass, atol=1e3 * jnp.finfo(x.dtype).eps)
    return centres, weights, inertia, t, done
