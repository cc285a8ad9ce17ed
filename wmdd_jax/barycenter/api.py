"""The public barycenter ops: one cloud, a labelled cloud by class, and their typed result."""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.barycenter.cloud import (_check_cloud, _check_num_support, _float_dtype, _invalid, _is_concrete,
                                       _normalise)
from wmdd_jax.barycenter.kmeans import _weighted_kmeans
from wmdd_jax.barycenter.precision import PrecisionLike, _matmul_precision
from wmdd_jax.barycenter.seeding import _kmeans_plus_plus, _restart_seed, _seed_words, _separate_coincident
from wmdd_jax.barycenter.uniform import _epsilon_schedule, _uniform_barycenter


class BarycenterOutput(NamedTuple):
    r"""Result of :func:`free_support_barycenter`; a leading ``[C]`` axis when batched.

    Attributes:
        support: ``[m, d]`` support points :math:`b_j`, in the input's coordinates.
        weights: ``[m]`` weights :math:`w_j`, summing to 1 (``1/m`` for uniform weights).
        cost: ``[]`` :math:`W_2^2(\nu, \sum_j w_j \delta_{b_j})` at the input's scale. Learned
            weights: the weighted k-means inertia, which is this W2^2 exactly. Uniform weights:
            :math:`\langle P', C\rangle` with :math:`P'` the last entropic plan (at the final,
            smallest epsilon) rounded onto the exact marginals, at the returned support: a feasible
            plan, so an upper bound of the exact W2^2 (up to float rounding); 0.01-0.03% above it
            on the benchmark's 512-d classes, up to 0.5% on the tests' 16-point clouds.
        num_iterations: ``[]`` outer steps run by the kept run (the annealed path or the second
            start, see ``second_start``; Lloyd steps of the best restart for learned weights).
        converged: ``[]`` bool: the last outer step moved the support by less than ``tol`` and (uniform
            weights) its Sinkhorn solve met its threshold. False, with NaN ``support``, ``weights``
            and ``cost``, for invalid values seen under ``jit`` (NaN/inf points of positive weight,
            NaN/inf or negative weights).
    """

    support: jax.Array
    weights: jax.Array
    cost: jax.Array
    num_iterations: jax.Array
    converged: jax.Array


def free_support_barycenter(
    points: jax.Array,
    num_support: int,
    *,
    point_weights: Optional[jax.Array] = None,
    learn_weights: bool = False,
    rng: Optional[jax.Array] = None,
    init: Optional[jax.Array] = None,
    num_iterations: int = 100,
    anneal_fraction: float = 0.6,
    epsilon_start: float = 0.3,
    epsilon_end: float = 1e-3,
    sinkhorn_threshold: float = 1e-3,
    polish_threshold: float = 1e-4,
    sinkhorn_chunk: int = 100,
    sinkhorn_max_iterations: int = 1000,
    sinkhorn_momentum: float = 1.6,
    inner_iterations: int = 10,
    n_init: int = 10,
    kmeans_max_iterations: int = 100,
    tol: Optional[float] = None,
    second_start: bool = True,
    second_start_epsilon: float = 1e-2,
    second_start_anneal_steps: int = 10,
    second_start_iterations: int = 30,
    second_start_sinkhorn_iterations: int = 300,
    split_delta: float = 1e-3,
    precision: PrecisionLike = "highest",
) -> BarycenterOutput:
    r"""Free-support :math:`W_2` barycenter (one measure: the best ``m``-point approximation) of a cloud.

    Args:
        points: ``[n, d]`` float array, the points :math:`x_i`.
        num_support: ``m``, the number of support points (static).
        point_weights: ``[n]`` non-negative weights :math:`a_i`, normalised here (default uniform).
            Zeros mark padding rows, which are ignored whatever they contain.
        learn_weights: ``False``: uniform weights ``1/m``, the annealed Sinkhorn fixed point.
            ``True``: the weights are optimised too, i.e. weighted k-means (see the module doc).
        rng: PRNG key for the k-means++ seeding (default ``jax.random.key(0)``).
        init: optional ``[m, d]`` initial support, replacing the seeding (and, with
            ``learn_weights``, the restarts).
        num_iterations: uniform weights: the most outer (fixed-point) steps, each one warm-started
            Sinkhorn solve.
        anneal_fraction: uniform weights: the fraction of ``num_iterations`` over which epsilon
            decays geometrically from ``epsilon_start`` to ``epsilon_end``; the other steps run at
            ``epsilon_end`` until the support moves less than ``tol``.
        epsilon_start, epsilon_end: entropic regularisation relative to the cloud's total variance
            :math:`\sum_i a_i\lVert x_i-\bar x\rVert^2`. Chosen on the benchmark's 512-d classes:
            ``epsilon_start`` 0.3 undoes poor seeding choices (0.1 kept some, 1 and 3 start from a
            nearly collapsed support and end worse); from ``epsilon_end`` 1e-3 on, POT's exact fixed
            point no longer improves the result (3e-4 and 1e-4 gave the same W2^2).
        sinkhorn_threshold: marginal error (L1) at which a Sinkhorn solve stops while annealing.
        polish_threshold: the same at ``epsilon_end``.
        sinkhorn_chunk: Sinkhorn iterations per round of the loop (see :func:`_uniform_barycenter`):
            the granularity at which a vmapped batch of classes waits for its slowest member.
        sinkhorn_max_iterations: the most Sinkhorn iterations for one outer step (rounded up to
            whole chunks); the step is then taken even if the plan has not converged.
        inner_iterations: Sinkhorn iterations between marginal-error checks (OTT's meaning).
        sinkhorn_momentum: fixed over-relaxation of the Sinkhorn updates, in ``[1, 2)``
            (1 = plain Sinkhorn; 1.8 and above diverged in our tests).
        n_init: learned weights: the number of k-means++ restarts (the lowest inertia is kept).
        kmeans_max_iterations: learned weights: the most Lloyd steps per restart.
        tol: convergence tolerance on the mean squared move of a support point in one outer step,
            relative to the variance. Default ``max(1e-10, 10 * (machine_eps / epsilon_end)**2)``:
            at small epsilon the plan, hence the fixed point, jitters by about
            ``machine_eps / epsilon`` (1e-4 relative in float32), so a smaller ``tol`` is never met.
        second_start: uniform weights: also run the fixed point from the same start (the seeding or
            ``init``) on a short path, epsilon decaying from ``second_start_epsilon`` to
            ``epsilon_end`` over ``second_start_anneal_steps`` steps, at most
            ``second_start_iterations`` steps of at most ``second_start_sinkhorn_iterations``
            Sinkhorn iterations, and keep the run with the lower (feasible-plan) cost. It guards
            against the annealed path ending worse than the exact fixed point from the start
            (seen at 4.6% on well-separated clusters); about doubles the run time (4.5 s -> 9.7 s,
            one 6000 x 512 class, m = 10, on a shared 2-core CPU). ``False``: the annealed path only.
        second_start_epsilon, second_start_anneal_steps, second_start_iterations,
            second_start_sinkhorn_iterations: the second start's path and budget (above).
        split_delta: uniform weights: support points of the start that coincide (more support
            points than distinct locations, or an ``init`` with repeated rows) are moved apart by
            this much (relative to the cloud's standard deviation, see
            :func:`_separate_coincident`), so that the fixed point can split them.
        precision: the precision of every matmul this call traces (squared distances, the
            barycentric projection ``P @ x``, OTT's cost matrices): ``"highest"`` (default: full
            float32 products), ``"high"``, ``"default"`` (the platform's fastest: one bfloat16
            pass on TPU, TF32 on recent NVIDIA GPUs, too coarse for ``epsilon_end`` 1e-3), or a
            ``jax.lax.Precision``. Static. The CPU backend computes float32 products in float32
            at every setting, so there it changes nothing.

    Returns:
        :class:`BarycenterOutput`: ``support [m, d]``, ``weights [m]``, ``cost []`` (W2^2 at the
        input's scale), ``num_iterations []``, ``converged []``; float32 for float16/bfloat16 input.

    Raises:
        ValueError: always (shapes are static, also under ``jit``) if ``points`` is not ``[n, d]``,
            ``point_weights`` not ``[n]``, ``init`` not ``[m, d]``, ``num_support`` not a positive
            int or ``precision`` none of the above; in eager calls also if a weight is non-finite or
            negative, the weights sum to 0, or a row of positive weight (or ``init``) holds NaN/inf.
            Under ``jit`` such values give ``support``, ``weights`` and ``cost`` NaN and
            ``converged`` False (both variants); an all-zero-weight (padding-only) class gives a
            finite, meaningless row.
    """
    with _matmul_precision(precision):
        num_support = _check_num_support(num_support)
        points = jnp.asarray(points)
        point_weights = None if point_weights is None else jnp.asarray(point_weights)
        _check_cloud("points", points, point_weights, "point_weights")
        if init is not None:
            init = jnp.asarray(init)
            if tuple(init.shape) != (num_support, points.shape[1]):
                raise ValueError(f"init must be a [num_support, d] = [{num_support}, {points.shape[1]}] "
                                 f"array of initial support points; got shape {tuple(init.shape)}.")
            if _is_concrete(init) and not bool(jnp.all(jnp.isfinite(init))):
                raise ValueError("init contains NaN or inf; pass finite initial support points.")
        # Under jit the values cannot be checked: an invalid class is run as an empty one (cheap) and
        # reported as NaN, never as a converged-looking result.
        invalid = _invalid(points, point_weights)
        if init is not None:
            invalid = jnp.logical_or(invalid, jnp.logical_not(jnp.all(jnp.isfinite(init))))
        x, a, centre, scale = _normalise(points, point_weights)
        x, a = jnp.where(invalid, 0.0, x), jnp.where(invalid, 1.0 / x.shape[0], a)
        dtype = x.dtype
        seed = _seed_words(jax.random.key(0) if rng is None else rng)
        if init is not None:
            init = jnp.where(invalid, 0.0, (init.astype(dtype) - centre) / scale)
        if tol is None:
            tol = max(1e-10, 10 * (float(jnp.finfo(dtype).eps) / epsilon_end) ** 2)

        if learn_weights:
            support, weights, cost, t, converged = _weighted_kmeans(
                x, a, num_support, seed, init=init, n_init=n_init, max_iterations=kmeans_max_iterations,
                tol=tol)
        else:
            if init is None:
                init = _kmeans_plus_plus(x, a, num_support, _restart_seed(seed, 0))
            init = _separate_coincident(init, seed, jnp.asarray(split_delta, dtype))
            anneal_steps = max(1, int(round(anneal_fraction * num_iterations)))
            run = functools.partial(
                _uniform_barycenter, x, a, sinkhorn_threshold=sinkhorn_threshold,
                polish_threshold=polish_threshold, sinkhorn_chunk=sinkhorn_chunk,
                sinkhorn_momentum=sinkhorn_momentum, inner_iterations=inner_iterations)
            epsilons = _epsilon_schedule(num_iterations, anneal_steps, epsilon_start, epsilon_end, dtype)
            best = run(init, epsilons=epsilons, anneal_steps=anneal_steps, tol=tol,
                       sinkhorn_max_iterations=sinkhorn_max_iterations)

            def keep_lower(best, other):  # costs of feasible plans: upper bounds, so comparable
                return jax.tree.map(lambda u, v: jnp.where(other[1] < best[1], v, u), best, other)

            if second_start:
                # The same start, barely annealed (from second_start_epsilon, below the scale of the
                # gaps between well-separated clusters): the entropic twin of POT's exact fixed point
                # from that start. The annealed path starts at a large epsilon, where the support
                # collapses and later splits between clusters as the path decides, which can be worse
                # than the start's allocation when m is no multiple of the cluster count; this one
                # keeps it. Its own, smaller budget: at small epsilon each outer step costs many more
                # Sinkhorn iterations (unbudgeted, 13 s against the annealed path's 5 s on one
                # 6000 x 512 class, m = 10).
                total = max(1, min(second_start_iterations, num_iterations))
                steps = min(second_start_anneal_steps, total)
                direct = _epsilon_schedule(total, steps, min(second_start_epsilon, epsilon_start),
                                           epsilon_end, dtype)
                best = keep_lower(best, run(init, epsilons=direct, anneal_steps=steps, tol=tol,
                                            sinkhorn_max_iterations=second_start_sinkhorn_iterations))
            support, cost, t, converged = best
            weights = jnp.full((num_support,), 1.0 / num_support, dtype)
        nan = jnp.array(jnp.nan, dtype)
        return BarycenterOutput(support=jnp.where(invalid, nan, centre + scale * support),
                                weights=jnp.where(invalid, nan, weights),
                                cost=jnp.where(invalid, nan, cost * scale**2), num_iterations=t,
                                converged=jnp.logical_and(converged, jnp.logical_not(invalid)))


def kmeans_plus_plus(
    points: jax.Array,
    num_support: int,
    *,
    point_weights: Optional[jax.Array] = None,
    rng: Optional[jax.Array] = None,
    precision: PrecisionLike = "highest",
) -> jax.Array:
    """The seeding :func:`free_support_barycenter` starts from, alone: ``[num_support, d]``.

    Weighted greedy k-means++ on the rows of ``points [n, d]`` (rules in :func:`_kmeans_plus_plus`).
    With the same ``rng`` it is the initial support of the uniform-weights variant (before
    coincident rows are moved apart by ``split_delta``) and of the first k-means restart: use it to
    start another solver from the same place. Inputs are checked, and ``precision`` (of the
    distances and the projection that orders the points) means the same, as in
    :func:`free_support_barycenter`.
    """
    with _matmul_precision(precision):
        num_support = _check_num_support(num_support)
        points = jnp.asarray(points)
        point_weights = None if point_weights is None else jnp.asarray(point_weights)
        _check_cloud("points", points, point_weights, "point_weights")
        x, a, centre, scale = _normalise(points, point_weights)
        seed = _seed_words(jax.random.key(0) if rng is None else rng)
        return centre + scale * _kmeans_plus_plus(x, a, num_support, _restart_seed(seed, 0))


def _check_labels(features, labels, num_classes) -> None:
    """``ValueError`` unless ``features [N, d]``, integer ``labels [N]`` and, when concrete, every
    label in ``[0, num_classes)`` (under ``jit`` an out-of-range label's point is dropped)."""
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, d] array; got shape {tuple(features.shape)}.")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be a [N] array, one label per row of features (N = "
                         f"{features.shape[0]}); got shape {tuple(labels.shape)}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers in [0, num_classes); got dtype {labels.dtype}.")
    if _is_concrete(labels) and labels.shape[0] and not bool(
            jnp.all((labels >= 0) & (labels < num_classes))):
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        raise ValueError(f"labels must lie in [0, {num_classes}) (num_classes = {num_classes}); got "
                         f"values from {lo} to {hi}. Pass num_classes > {hi} or remap the labels.")


def pad_classes(features: jax.Array, labels: jax.Array, num_classes: int,
                max_class_size: Optional[int] = None):
    """Group a labelled cloud into per-class clouds padded to one size.

    Args:
        features: ``[N, d]``. labels: ``[N]`` ints in ``[0, num_classes)``.
        num_classes: ``C`` (static).
        max_class_size: ``n_max`` (static). ``None``: the largest class, read from concrete
            ``labels`` (so pass it under ``jit``). Points beyond ``n_max`` in a class are dropped.

    Returns:
        ``(points [C, n_max, d], weights [C, n_max])``: class ``k``'s features in their original
        order, then zero rows of weight 0; a class's weights are ``1/n_k`` on its real points.

    Raises:
        ValueError: ``features`` not ``[N, d]``, ``labels`` not ``[N]`` integers or, when concrete,
            a label outside ``[0, num_classes)`` (under ``jit`` such a point is dropped).
    """
    features, labels = jnp.asarray(features), jnp.asarray(labels)
    _check_labels(features, labels, num_classes)
    n = labels.shape[0]
    if max_class_size is None:
        max_class_size = max(int(np.bincount(np.asarray(labels), minlength=num_classes).max()), 1)
    order = jnp.argsort(labels, stable=True)
    sorted_labels = labels[order]
    counts = jnp.bincount(labels, length=num_classes)
    rank = jnp.arange(n) - (jnp.cumsum(counts) - counts)[sorted_labels]  # position within class
    index = jnp.full((num_classes, max_class_size), n, jnp.int32)
    index = index.at[sorted_labels, rank].set(order.astype(jnp.int32), mode="drop")
    real = index < n
    points = jnp.where(real[..., None], features[jnp.minimum(index, n - 1)], 0)
    kept = jnp.sum(real, axis=1, keepdims=True)
    weights = jnp.where(real, 1.0 / jnp.maximum(kept, 1), 0.0)
    return points, weights.astype(_float_dtype(features))


def class_barycenters(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    num_support: int,
    *,
    rng: Optional[jax.Array] = None,
    max_class_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    precision: PrecisionLike = "highest",
    **kwargs,
) -> BarycenterOutput:
    """One barycenter per class: :func:`pad_classes`, then ``vmap`` over the class axis.

    Args:
        features: ``[N, d]``. labels: ``[N]`` ints in ``[0, num_classes)``.
        num_classes: ``C``. num_support: ``m`` per class.
        rng: PRNG key (default ``jax.random.key(0)``); class ``k`` uses
            ``jax.random.split(rng, C)[k]``, so its row equals :func:`free_support_barycenter` on
            that class alone with that key (padding changes nothing). Or ``[C]`` keys, one per
            class (a subset of classes keeps the keys it has in the whole set).
        max_class_size: see :func:`pad_classes` (required under ``jit``).
        batch_size: ``None``: all classes in one ``vmap`` (best on accelerators). An int: classes
            in sequential chunks of that size (``jax.lax.map``); on CPU ``1`` is about twice as fast
            as one big ``vmap``, whose iterations wait for the slowest class and cost more per class.
        precision: of every matmul traced, see :func:`free_support_barycenter` (default
            ``"highest"``; ``ValueError`` for other values than listed there).
        **kwargs: passed on to :func:`free_support_barycenter`.

    Returns:
        :class:`BarycenterOutput` with ``support [C, m, d]``, ``weights [C, m]``, ``cost [C]``,
        ``num_iterations [C]``, ``converged [C]``. An empty class gives a finite, meaningless row.

    To spread the classes over devices, put the class axis of ``pad_classes``' outputs and of the
    keys on a mesh axis and run the same ``vmap`` inside ``jax.shard_map`` (or call this under
    ``jit`` with class-sharded inputs).
    """
    with _matmul_precision(precision):
        num_support = _check_num_support(num_support)
        features = jnp.asarray(features)
        if _is_concrete(features) and not bool(jnp.all(jnp.isfinite(features))):
            raise ValueError("features contain NaN or inf; pass finite features (under jit such a "
                             "class gives a NaN row with converged=False).")
        rng = jax.random.key(0) if rng is None else rng
        points, weights = pad_classes(features, labels, num_classes, max_class_size)

        def one(args):
            p, w, key = args
            return free_support_barycenter(p, num_support, point_weights=w, rng=key, precision=precision,
                                           **kwargs)

        typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        keys = rng if rng.ndim == (1 if typed else 2) else jax.random.split(rng, num_classes)
        args = (points, weights, keys)
        if batch_size is None:
            return jax.vmap(one)(args)
        return jax.lax.map(one, args, batch_size=batch_size)
