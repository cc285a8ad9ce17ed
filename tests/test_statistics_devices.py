"""wmdd_jax.distill.class_stats on 4 simulated CPU devices: the batches are split over all local devices.

The device count must be fixed before jax starts, so the checks run in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=4; this process's jax is left alone.

Each image's features and BN moments are computed alone (eval mode), and the pooling is on the host
in float64, so the device count changes only the per-device batch shape. With lax.conv (the tests'
convolution) 4 devices and 1 gave the same bits on this project's CPU machine; with the CPU's
Winograd kernels a ResNet-18 differed by 2.4e-6 in features and 1.8e-7 in BN statistics, as much as
one device with batch 25 against batch 100 does. The bound below allows for other XLA builds.
"""

import textwrap

from tests.conftest import run_on_cpu_devices


SCRIPT = textwrap.dedent("""
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from tests.conftest import CONV_IMPL, tiny_config
    from wmdd_jax.data import load_split
    from wmdd_jax.distill import class_stats
    from wmdd_jax.models import create_model
    from wmdd_jax.train_step import Teacher, init_variables

    assert jax.local_device_count() == 4, jax.local_devices()
    source = load_split(tiny_config().data, "train")  # 40 images per class
    model = create_model("convnet3", source.num_classes, norm="batch", width=8, conv_impl=CONV_IMPL)
    teacher = Teacher(model, init_variables(model, jax.random.key(0), tuple(source.image_shape)))

    calls = []  # (input sharding, features sharding, features' per-device rows) of every batch
    feature_fn = class_stats._feature_fn
    def spy(model):
        run = feature_fn(model)
        def recorded(variables, x):
            features, moments = run(variables, x)
            calls.append((x.sharding, features.sharding, [s.data.shape[0] for s in features.addressable_shards]))
            return features, moments
        return recorded
    class_stats._feature_fn = spy

    one = class_stats.class_statistics(teacher, source, devices=jax.local_devices()[:1], verbose=False)
    assert [len(c[2]) for c in calls] == [1], calls
    calls.clear()
    # The default on a CPU: its first device (a process's CPU devices share its cores).
    class_stats.class_statistics(teacher, source, classes=[0], verbose=False)
    assert [len(c[2]) for c in calls] == [1], calls
    calls.clear()
    everything = jax.local_devices()
    four = class_stats.class_statistics(teacher, source, devices=everything, verbose=False)
    # 30 is no multiple of 4 (rounded up to 32); 120 images: 3 full batches and one of 24 real rows.
    classes = [2, 5, 9]
    odd = class_stats.class_statistics(teacher, source, classes=classes, batch_size=30, devices=everything,
                                       verbose=False)

    # (c) every batch was split over the 4 devices, and the program's outputs stayed split.
    assert [c[2] for c in calls] == [[125] * 4] + [[8] * 4] * 4, [c[2] for c in calls]
    for x_sharding, f_sharding, _ in calls:
        for s in (x_sharding, f_sharding):
            assert len(s.device_set) == 4 and s.spec == P("batch"), s

    # (a), (b): the same statistics as on one device.
    def check(got, want, rows):
        assert got.classes == [want.classes[i] for i in rows]
        assert list(got.bn_mean) == list(want.bn_mean) and list(got.bn_var) == list(want.bn_var)
        for i, r in enumerate(rows):
            np.testing.assert_array_equal(got.indices[i], want.indices[r])
            np.testing.assert_allclose(got.features[i], want.features[r], rtol=1e-5, atol=1e-6)
        for layer in want.bn_mean:
            np.testing.assert_allclose(got.bn_mean[layer], want.bn_mean[layer][rows], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.bn_var[layer], want.bn_var[layer][rows], rtol=1e-5, atol=1e-6)
    check(four, one, list(range(source.num_classes)))
    check(odd, one, classes)
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(four.features, one.features))
    print(f"statistics on 4 devices OK (largest feature gap {gap:.3g})")
""")


def test_statistics_on_four_devices_match_one():
    proc = run_on_cpu_devices(SCRIPT, 4)
    assert proc.returncode == 0 and "statistics on 4 devices OK" in proc.stdout, proc.stdout + proc.stderr[-5000:]
