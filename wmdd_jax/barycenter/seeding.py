"""Where the support starts: weighted k-means++ on the data points, by a counter-based hash PRNG,
with the rule for duplicate locations and the split of coincident support points."""

import math

import jax
import jax.numpy as jnp

from wmdd_jax.barycenter.cloud import _sq_dists
from wmdd_jax.barycenter.ott_compat import _pvary, _varying_axes


def _seed_words(rng) -> jax.Array:
    """The raw ``uint32`` words of a PRNG key (typed, or a legacy ``uint32[2]`` key)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return rng.astype(jnp.uint32).reshape(-1)


def _restart_seed(seed, restart):
    """Seed words of restart ``restart``; restart 0 also seeds the uniform variant."""
    return jnp.concatenate([seed, jnp.asarray(restart, jnp.uint32)[None]])


def _mix32(h):
    """MurmurHash3's 32-bit finaliser: a bijective avalanche on ``uint32``."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash_uniform(seed, step, index, dtype):
    """Uniform(0, 1) noise that is a pure function of ``(seed, step, index)``.

    The seeding needs O(k * trials * n) random numbers, and point ``index`` must get the same number
    whatever the padding. ``jax.random`` keys folded in per point give that too, but compile to
    threefry rounds: measured (``experiments/bench_seeding_prng.py``, one 6000 x 512 class, rows in
    ``experiments/results/bench_seeding_prng.jsonl``) they made every barycenter program 1.3-2.3x
    slower to compile (learned weights, m=10: 10.9 s -> 25.6 s; uniform, m=10: 7.4 s -> 12.2 s) and
    ran no faster. This counter-based hash compiles to a few integer ops.

    Args:
        seed: ``uint32[w]`` key words. step: ``uint32`` scalar. index: ``uint32`` array.

    Returns:
        An array shaped like ``index`` with values in (0, 1).
    """
    h = jnp.uint32(0x9E3779B9) * (step + jnp.uint32(1))
    for word in seed:
        h = _mix32(h ^ word)
    h = _mix32(h ^ (index * jnp.uint32(0x85EBCA77) + jnp.uint32(0x27D4EB2F)))
    h = _mix32(h + index)
    # 24 random bits, centred in their bucket so that 0 and 1 never occur.
    return ((h >> 8).astype(dtype) + 0.5) * (2.0**-24)


def _gumbel_draws(seed, step, logits, num):
    """``[num]`` independent draws from ``softmax(logits [n])`` by the Gumbel-max trick."""
    n = logits.shape[0]
    # Counter of entry i in draw l: l in the high byte and i below (not l * n + i, which depends
    # on n), so appending padding leaves the real points' noise alone. Assumes n < 2**24.
    index = (jnp.arange(num, dtype=jnp.uint32)[:, None] << 24) + jnp.arange(n, dtype=jnp.uint32)
    u = _hash_uniform(seed, step, index, logits.dtype)
    return jnp.argmax(logits[None] - jnp.log(-jnp.log(u)), axis=-1)


def _kmeans_plus_plus(x, a, k, seed, n_local_trials=None):
    """Weighted greedy k-means++ seeding (Arthur & Vassilvitskii 2007).

    The first centre is drawn with probability ``a_i``; each next one among ``n_local_trials``
    candidates drawn with probability proportional to ``a_i D(x_i)^2`` (``D``: distance to the
    nearest centre so far), keeping the candidate that lowers ``sum_i a_i D(x_i)^2`` most.
    Zero-weight (padding) points are never drawn.

    The points are first put in a canonical order (by projection on a random direction, padding
    last), so the centres depend neither on the order of the rows nor on the padding.

    Once every real point is a centre (all ``D = 0``: fewer distinct locations than ``k``), the
    remaining centres are copies, handed out per distinct *location*, not per row: location ``l``
    (mass ``A_l``, the summed weight of the rows on it, by a label that each point keeps of its
    nearest centre, so no ``[n, n]`` matrix) gets the next copy if it maximises
    ``A_l / (copies_l + 1)`` (highest averages), so copies follow the location masses whatever the
    number of duplicate rows.

    Args:
        x: ``[n, d]`` points. a: ``[n]`` weights summing to 1. k: number of centres (static).
        seed: ``uint32[w]`` words for :func:`_hash_uniform`.

    Returns:
        ``[k, d]`` centres, rows of ``x``.
    """
    if n_local_trials is None:
        n_local_trials = 2 + int(math.log(k))
    dims = jnp.arange(x.shape[1], dtype=jnp.uint32)
    direction = _hash_uniform(seed, jnp.uint32(0xFFFFFFFF), dims, x.dtype) - 0.5
    order = jnp.lexsort((x @ direction, a == 0))
    x, a = x[order], a[order]
    sq = jnp.sum(x * x, axis=-1)
    # Squared distances within float rounding of |x|^2 + |c|^2 count as zero, so a chosen point
    # (and its exact duplicates) has no potential left.
    rounding = 8 * jnp.finfo(x.dtype).eps

    def dists(idx):  # [t] -> [t, n]
        d2 = _sq_dists(x[idx], x)
        return jnp.where(d2 <= rounding * (sq[idx][:, None] + sq[None]), 0.0, d2)

    first = _gumbel_draws(seed, jnp.uint32(0), jnp.log(a), 1)[0]  # log(0) = -inf: never padding
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    # label: the centre each point is nearest so far (its location, once all are covered);
    # copies[j]: how many centres sit on the location first taken by centre j (0 for the copies).
    label = jnp.zeros(x.shape[:1], jnp.int32)
    copies = jnp.zeros((k,), x.dtype).at[0].set(1)
    carry = _pvary((centres, dists(first[None])[0], label, copies), _varying_axes((x, a, seed)))

    def body(carry, j):
        centres, d2, label, copies = carry
        potential = a * d2
        cand = _gumbel_draws(seed, j.astype(jnp.uint32), jnp.log(potential), n_local_trials)
        cand_d2 = jnp.minimum(dists(cand), d2[None])
        pick = jnp.argmin(cand_d2 @ a)
        best, new_d2 = cand[pick], cand_d2[pick]
        new_centre, new_label = x[best], jnp.where(new_d2 < d2, j.astype(jnp.int32), label)
        # Every real point is a centre: hand out copies per distinct location (the summed weight
        # of its rows, by the labels), not per row, or 25 duplicate rows of one location would
        # draw 25 copies while an equally heavy location drew one.
        covered = jnp.sum(potential) <= 0
        mass = jax.ops.segment_sum(a, label, num_segments=k)
        owner = jnp.argmax(mass / (copies + 1))
        centre = jnp.where(covered, centres[owner], new_centre)
        copies = jnp.where(covered, copies.at[owner].add(1), copies.at[j].set(1))
        return (centres.at[j].set(centre), jnp.where(covered, d2, new_d2),
                jnp.where(covered, label, new_label), copies), None

    (centres, _, _, _), _ = jax.lax.scan(body, carry, jnp.arange(1, k))
    return centres


def _separate_coincident(support, seed, delta):
    """Move every support point that coincides with an earlier one by ``delta`` (unit-variance
    units) in a pseudo-random direction, the ``r``-th copy of a location also ``r * delta``
    towards the cloud's mean (the origin here).

    Copies of one location have identical cost rows, hence identical plan rows under the uniform
    fixed point, and would move together forever: 3 copies on a location of mass 1/2 at
    ``m = 5`` could never become 2 there and 1 between two locations. The plan's dependence on a
    support point's position is unstable exactly there, so any asymmetry grows as epsilon
    decreases; the shift towards the mean gives it a component towards the other mass in every
    dimension (a random direction alone has only ``1/sqrt(d)`` of it). ``delta`` far below the
    cloud's scale changes nothing else: distinct support points are left alone.

    Args:
        support: ``[m, d]``. seed: ``uint32[w]`` words. delta: scalar.

    Returns:
        ``[m, d]``.
    """
    m, d = support.shape
    d2 = _sq_dists(support, support)
    sq = jnp.sum(support * support, axis=-1)
    same = d2 <= 8 * jnp.finfo(support.dtype).eps * (sq[:, None] + sq[None])
    earlier = jnp.tril(same, k=-1)  # [m, m]: i < j on the same location
    rank = jnp.sum(earlier, axis=1).astype(support.dtype)  # copies before j on its location
    index = (jnp.arange(m, dtype=jnp.uint32)[:, None] << 16) + jnp.arange(d, dtype=jnp.uint32)
    noise = _hash_uniform(seed, jnp.uint32(0xFFFFFFFE), index, support.dtype) - 0.5
    noise = noise / jnp.linalg.norm(noise, axis=-1, keepdims=True)
    norm = jnp.sqrt(sq)[:, None]
    inward = jnp.where(norm > 0, -support / jnp.where(norm > 0, norm, 1.0), 0.0)
    return support + delta * rank[:, None] * (noise + inward)
