"""OTT-JAX's Sinkhorn made ``shard_map``-safe, and the varying-axes casts that takes.

Inside ``jax.shard_map(check_vma=True)`` a loop carry must have the same varying-axes type on entry
and exit; OTT builds a few loop values from constants, which are invariant while the data vary.
"""

import warnings

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
    # `import ott` pulls in jaxopt, which raises a DeprecationWarning on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from ott.solvers.linear import sinkhorn


def _varying_axes(tree) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) over which any leaf of ``tree`` varies."""
    axes = frozenset()
    for leaf in jax.tree.leaves(tree):
        aval = jax.typeof(leaf)
        vma = getattr(aval, "vma", None)
        if vma is None:  # jax 0.10 keeps it in the manual-axis type
            mat = getattr(aval, "mat", None)
            vma = mat.varying if mat is not None else frozenset()
        axes |= vma
    return axes


def _pvary(tree, axes: frozenset):
    """Mark every leaf of ``tree`` as varying over ``axes`` (a no-op outside ``shard_map``).

    Under ``shard_map(check_vma=True)`` a loop carry must have the same varying-axes type on entry
    and exit. Carries built from constants (``jnp.zeros``) are invariant, while the loop body mixes
    them with per-shard data and makes them varying, so we cast them up front rather than asking
    users for ``check_vma=False``.
    """

    def cast(leaf):
        missing = tuple(sorted(axes - _varying_axes(leaf)))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


@jax.tree_util.register_pytree_node_class
class _Sinkhorn(sinkhorn.Sinkhorn):
    """OTT's :class:`~ott.solvers.linear.sinkhorn.Sinkhorn`, made ``shard_map``-safe.

    OTT builds two loop values from constants: the ``errors`` buffer of the initial state and the
    ``inf`` that the ``lax.cond`` returns on iterations that skip the marginal error. Inside
    ``shard_map`` both are invariant while the data vary, and JAX rejects the loop (OTT's own
    ``FreeWassersteinBarycenter`` needs ``check_vma=False`` for this reason). These two overrides cast
    them to the problem's varying axes; outside ``shard_map`` the casts are no-ops and this is OTT's
    solver, iteration for iteration (``one_iteration`` also keeps the error check a real ``cond``
    under ``vmap``, see there). Anderson acceleration and adaptive momentum (both also branch on
    constants) are not supported; we use neither.
    """

    def init_state(self, ot_prob, init):  # noqa: D102
        axes = _varying_axes((ot_prob, init))
        state = super().init_state(ot_prob, _pvary(init, axes))
        return state.set(errors=_pvary(state.errors, axes))

    # OTT's `Sinkhorn.one_iteration` (ott-jax 0.6.0) restated; it differs in two places only: the
    # skipped branch's inf is cast to the varying axes, and the predicate stays unbatched under vmap.
    # tests/test_barycenter.py fails when OTT's method changes, so that this copy is read again.
    def one_iteration(self, ot_prob, state, iteration, compute_error):  # noqa: D102
        assert not self.anderson, "Anderson acceleration is not supported."
        if self.lse_mode:
            state = self.lse_step(ot_prob, state, iteration)
        else:
            state = self.kernel_step(ot_prob, state, iteration)

        def error(state):
            return state.solution_error(ot_prob, self.norm_error, lse_mode=self.lse_mode,
                                        parallel_dual_updates=self.parallel_dual_updates,
                                        recenter=self.recenter_potentials)[0]

        skipped = _pvary(jnp.array(jnp.inf, dtype=ot_prob.dtype), _varying_axes(state))
        if self.min_iterations == 0 and self.max_iterations % self.inner_iterations == 0:
            # OTT's condition reduces to the flag of the inner scan. Unlike the loop counter, that
            # flag is never batched, so under vmap this stays a cond; a batched predicate would
            # turn it into a select that computes the error (a full extra pass) every iteration.
            check = compute_error
        else:
            check = jnp.logical_or(iteration == self.max_iterations - 1,
                                   jnp.logical_and(compute_error, iteration >= self.min_iterations))
        err = jax.lax.cond(check, error, lambda _: skipped, state)
        errors = state.errors.at[iteration // self.inner_iterations, :].set(err)
        state = state.set(errors=errors)
        if self.progress_fn is not None:
            jax.debug.callback(self.progress_fn, (iteration, self.inner_iterations, self.max_iterations, state))
        return state
