"""wmdd_jax.barycenter on 8 simulated CPU devices: pmap and shard_map equal the unbatched calls.

The device count must be fixed before jax starts, so the checks run in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=8; this process's jax is left alone.
"""

import textwrap

from tests.conftest import run_on_cpu_devices


SCRIPT = textwrap.dedent("""
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from wmdd_jax import barycenter

    assert jax.device_count() == 8, jax.devices()
    C, M = 16, 3
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 13, C)  # unequal classes, padded to 12 rows with zero weight
    labels = np.repeat(np.arange(C), sizes).astype(np.int32)
    features = (rng.normal(size=(len(labels), 4)) + 3 * rng.normal(size=(C, 4))[labels]).astype(np.float32)
    points, weights = barycenter.pad_classes(features, labels, C, 12)
    keys = jax.random.split(jax.random.key(0), C)

    def both(p, w, k):  # one class, both variants
        return tuple(barycenter.free_support_barycenter(p, M, point_weights=w, rng=k, learn_weights=lw)
                     for lw in (False, True))

    one = jax.jit(both)
    ref = [one(points[c], weights[c], keys[c]) for c in range(C)]
    ref = jax.tree.map(lambda *v: np.stack(v), *ref)

    # pmap: one class per device (the first 8 classes).
    out_pmap = jax.pmap(both)(points[:8], weights[:8], keys[:8])

    # shard_map: the class axis sharded over the mesh (make_mesh's default axis types), two classes
    # per device batched by vmap inside; check_vma stays on (its default).
    mesh = jax.make_mesh((8,), ("classes",))
    spec = P("classes")
    sharded = jax.device_put((points, weights, keys), NamedSharding(mesh, spec))
    fn = jax.jit(jax.shard_map(jax.vmap(both), mesh=mesh, in_specs=spec, out_specs=spec))
    out_shard = fn(*sharded)
    assert out_shard[0].support.sharding.spec[0] == "classes"

    # Uniform weights: float32 Sinkhorn at epsilon = 1e-3 of the variance differs from the unbatched
    # run by rounding amplified ~1/epsilon (points here are O(3)); learned weights: to rounding.
    for name, out, n in (("pmap", out_pmap, 8), ("shard_map", out_shard, C)):
        for variant, atol in ((0, 5e-3), (1, 1e-5)):
            got = jax.tree.map(np.asarray, out[variant])
            want = jax.tree.map(lambda v: v[:n], ref[variant])
            np.testing.assert_allclose(got.support, want.support, atol=atol, err_msg=f"{name} {variant}")
            np.testing.assert_allclose(got.weights, want.weights, atol=1e-6, err_msg=f"{name} {variant}")
            np.testing.assert_allclose(got.cost, want.cost, rtol=5e-3, atol=1e-6, err_msg=f"{name} {variant}")
            assert np.all(np.isfinite(got.support)), name

    # The barycenter stage's own split (wmdd_jax.distill.targets): 13 classes of a process over the 8
    # devices (padded to 16), against the stage on one device; same tolerances.
    import ml_collections
    from wmdd_jax.distill.class_stats import ClassStatistics
    from wmdd_jax.distill.targets import compute_barycenters
    mine = list(range(3, 16))
    feats = [features[labels == c] for c in mine]
    stats = ClassStatistics(mine, feats, [np.arange(len(f)) for f in feats], {}, {})
    for lw, atol in ((False, 5e-3), (True, 1e-5)):
        cfg = ml_collections.ConfigDict(dict(learn_weights=lw, num_iterations=100, batch_size=1))
        alone = compute_barycenters(stats, M, cfg, 0, C, devices=jax.devices()[:1])
        spread = compute_barycenters(stats, M, cfg, 0, C, devices=jax.devices())
        assert spread.support.shape == (13, M, 4) and len(spread.support.sharding.device_set) == 8
        np.testing.assert_allclose(spread.support, alone.support, atol=atol, err_msg=f"stage {lw}")
        np.testing.assert_allclose(spread.weights, alone.weights, atol=1e-6, err_msg=f"stage {lw}")
        np.testing.assert_allclose(spread.cost, alone.cost, rtol=5e-3, atol=1e-6, err_msg=f"stage {lw}")
    # Fewer classes than devices: 3 classes, 5 padding ones.
    few = ClassStatistics(mine[:3], feats[:3], [np.arange(len(f)) for f in feats[:3]], {}, {})
    spread = compute_barycenters(few, M, cfg, 0, C, devices=jax.devices())
    np.testing.assert_allclose(spread.support, alone.support[:3], atol=1e-5, err_msg="3 classes on 8 devices")
    print("multidevice OK")
""")


def test_pmap_and_shard_map_match_unbatched():
    proc = run_on_cpu_devices(SCRIPT, 8)
    assert proc.returncode == 0 and "multidevice OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]
