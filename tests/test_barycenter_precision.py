"""wmdd_jax.barycenter's ``precision`` argument reaches every matmul of the program it traces.

JAX's default float32 matmul on TPU is one bfloat16 pass, so the barycenter ops trace their bodies
at ``precision="highest"`` unless told otherwise. This CPU host cannot run a TPU program, but libtpu
compiles for a TPU topology without chips: each public op that multiplies matrices
(``class_barycenters`` with uniform weights, ``free_support_barycenter`` with learned weights,
``wasserstein2``, ``kmeans_plus_plus``) is lowered for a v5e 2x2 slice, and every
``stablehlo.dot_general`` / ``stablehlo.dot`` in the StableHLO text, OTT's cost matrices and
Sinkhorn included, must carry ``precision = [HIGHEST, HIGHEST]``; with ``precision="default"``
some must not (so the check can fail). Tiny shapes, ``lower()`` only. Skipped where libtpu is not
installed. Also: invalid values raise ``ValueError``, and on CPU the setting changes no result.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from wmdd_jax import barycenter
from wmdd_jax.host import tpu_present

C, N, D, M = 3, 16, 8, 2  # classes, points per class, dimensions, support points


@pytest.fixture(scope="module")
def replicated():
    """A sharding replicated over a v5e 2x2 TPU topology (4 chips), made without TPU chips."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    with pytest.MonkeyPatch.context() as patch:
        if not tpu_present():
            # No chips to share: skip libtpu's one-process-per-host lockfile, which another process
            # compiling for TPU on this host may hold.
            patch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = topologies.make_mesh(topo, (4,), ("x",))
    return NamedSharding(mesh, P())


def _dot_precisions(text: str) -> list:
    """The ``precision`` operand pair of every dot in StableHLO ``text`` (``None``: no attribute)."""
    found = []
    for line in text.splitlines():
        if re.search(r"stablehlo\.dot(_general)?\b", line):
            match = re.search(r"precision = \[(\w+), (\w+)\]", line)
            found.append(match.groups() if match else None)
    return found


def _class_barycenters(spec, **kwargs):
    fn = functools.partial(barycenter.class_barycenters, num_classes=C, num_support=M, max_class_size=N,
                           num_iterations=3, second_start_iterations=2, sinkhorn_max_iterations=20,
                           sinkhorn_chunk=10, **kwargs)
    return jax.jit(fn).lower(spec((C * N, D)), spec((C * N,), jnp.int32))


def _learned_weights(spec, **kwargs):
    fn = functools.partial(barycenter.free_support_barycenter, num_support=M, learn_weights=True, n_init=2,
                           kmeans_max_iterations=3, **kwargs)
    return jax.jit(fn).lower(spec((N, D)), point_weights=spec((N,)))


def _wasserstein2(spec, **kwargs):
    fn = functools.partial(barycenter.wasserstein2, max_iterations=100, **kwargs)
    return jax.jit(fn).lower(spec((N, D)), None, spec((N - 4, D)), None)


def _kmeans_plus_plus(spec, **kwargs):
    fn = functools.partial(barycenter.kmeans_plus_plus, num_support=M, **kwargs)
    return jax.jit(fn).lower(spec((N, D)))


LOWERINGS = {
    "class_barycenters": _class_barycenters,
    "free_support_barycenter_learned_weights": _learned_weights,
    "wasserstein2": _wasserstein2,
    "wasserstein2_debiased": functools.partial(_wasserstein2, debiased=True),
    "kmeans_plus_plus": _kmeans_plus_plus,
}


@pytest.mark.parametrize("name", sorted(LOWERINGS))
def test_every_matmul_is_lowered_at_the_requested_precision(replicated, name):
    def spec(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    lower = LOWERINGS[name]
    highest = ("HIGHEST", "HIGHEST")
    by_default = _dot_precisions(lower(spec).as_text())  # no argument: "highest"
    assert by_default, f"{name}: no dot in the lowered program; the check would be vacuous"
    assert all(p == highest for p in by_default), f"{name}: {by_default}"
    as_enum = _dot_precisions(lower(spec, precision=jax.lax.Precision.HIGHEST).as_text())
    assert as_enum == by_default, name
    fast = _dot_precisions(lower(spec, precision="default").as_text())
    assert len(fast) == len(by_default) and any(p != highest for p in fast), f"{name}: {fast}"


@pytest.mark.parametrize("bad", ["fast", "float32", None, 2])
def test_invalid_precision_raises(bad):
    x = np.zeros((4, 2), np.float32)
    for call in (lambda: barycenter.free_support_barycenter(x, 2, precision=bad),
                 lambda: barycenter.class_barycenters(x, np.zeros(4, np.int32), 1, 2, precision=bad),
                 lambda: barycenter.wasserstein2(x, None, x, None, precision=bad),
                 lambda: barycenter.kmeans_plus_plus(x, 2, precision=bad)):
        with pytest.raises(ValueError, match="precision must be one of 'default', 'high', 'highest'"):
            call()


def test_precision_changes_nothing_on_cpu():
    # XLA:CPU multiplies float32 in float32 at every precision, so the results must agree to
    # rounding (they are in fact bitwise equal; 1e-6 leaves room for another XLA build). The
    # barycenter ops trace the same matmuls (the lowering test above), so one op stands for all.
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU backend only")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (rng.normal(size=(N - 4, D)) + 1).astype(np.float32)
    fast, full = (jax.jit(functools.partial(barycenter.wasserstein2, max_iterations=200, precision=p))(
        x, None, y, None) for p in ("default", "highest"))
    np.testing.assert_allclose(fast, full, rtol=1e-6)
