"""Models: parameter counts of the PyTorch originals, features, BatchNorm statistics, conv kernels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax.models import BN_STATS, collect_bn_moments, create_model, pooled_moments
from wmdd_jax.train_step import init_variables


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def normal(seed, shape):
    """float32 Gaussian test data from NumPy: a jax.random draw of a new shape compiles (seconds on CPU)."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_variables(model, image_shape, seed=0):
    """Kernels at He scale (std sqrt(2 / fan-in), the models' "kaiming" init), norm scales near 1, biases and
    running means near 0, running variances in [0.5, 2], drawn by NumPy: the library's init compiles
    one random draw per parameter shape (13 s for a ResNet-18 on a loaded 2-core CPU), and tests of
    the forward pass need none."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))

    def draw(path, s):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        if len(s.shape) == 1:  # norm scales; biases and running means
            return ((name == "scale") + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
        return (rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("name,kwargs,shape,classes,expected", [
    # DC/DM ConvNet(channel=1, net_width=128, depth=3, im_size=28): the first conv pads by 3, so
    # 3 convs, 3 GroupNorm(128,128) and Linear(128*4*4=2048, 10).
    ("convnet3", dict(norm="instance"), (28, 28, 1), 10, 317_706),
    # Our Fashion-MNIST teacher pads by 1: Linear(128*3*3=1152, 10).
    ("convnet3", dict(norm="batch", first_padding=1), (28, 28, 1), 10, 308_746),
    # ConvNetD4 on 32x32x3 (CIFAR-10): 4 pools leave 2x2x128 = 512 features.
    ("convnet4", dict(norm="instance"), (32, 32, 3), 10, 3 * 9 * 128 + 128 + 3 * (128 * 9 * 128 + 128) + 4 * 256 + 512 * 10 + 10),
    # torchvision resnet18(num_classes=1000): 11,689,512 parameters.
    ("resnet18", dict(stem="imagenet"), (64, 64, 3), 1000, 11_689_512),
    # The same with a 3x3 stem conv (CIFAR style) and 10 classes: 11,689,512 - 9408 + 1728 - 513*990.
    ("resnet18", dict(stem="small"), (32, 32, 3), 10, 11_173_962),
])
def test_parameter_counts_match_pytorch(name, kwargs, shape, classes, expected):
    model = create_model(name, classes, **kwargs)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))
    assert count(variables["params"]) == expected
    assert BN_STATS not in variables


def test_features_are_the_classifier_input():
    model = create_model("convnet3", 10, norm="instance", width=16)
    variables = random_variables(model, (28, 28, 1))
    x = normal(1, (3, 28, 28, 1))
    logits, features = jax.jit(functools.partial(model.apply, return_features=True))(variables, x)
    assert features.shape == (3, 16 * 4 * 4)  # 28 px, first conv padded by 3 (DC): 32 -> 16 -> 8 -> 4
    head = variables["params"]["classifier"]
    np.testing.assert_allclose(features @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5)


def test_bn_moments_give_batch_and_class_statistics():
    """Per-sample moments pooled by `pooled_moments` equal the statistics of the BN input itself."""
    model = create_model("convnet3", 4, norm="batch", width=8, first_padding=1)
    variables = random_variables(model, (12, 12, 1))
    x = normal(1, (6, 12, 12, 1))
    labels = jnp.array([0, 1, 1, 2, 2, 2])
    _, state = jax.jit(functools.partial(model.apply, train=False, mutable=[BN_STATS]))(variables, x)
    moments = collect_bn_moments(state)
    assert list(moments) == ["norm0", "norm1", "norm2"]
    # The first BN layer's input is the first convolution's output.
    p = variables["params"]["conv0"]
    first_input = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), [(1, 1)] * 2,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    mean, var = pooled_moments(*moments["norm0"])
    np.testing.assert_allclose(mean, first_input.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, first_input.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
    cmean, cvar = pooled_moments(*moments["norm0"], segment_ids=labels, num_segments=3)
    for k in range(3):
        sel = first_input[np.asarray(labels) == k]
        np.testing.assert_allclose(cmean[k], sel.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cvar[k], sel.var((0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_batchnorm_running_statistics_follow_pytorch():
    """momentum 0.1 and the unbiased batch variance, as torch.nn.BatchNorm2d."""
    model = create_model("convnet3", 2, norm="batch", width=4, first_padding=1)
    variables = random_variables(model, (8, 8, 1))
    x = normal(1, (5, 8, 8, 1))
    _, upd = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats", BN_STATS]))(variables, x)
    first = collect_bn_moments(upd)["norm0"]
    mean, var = pooled_moments(*first)
    n = 5 * 8 * 8
    old = variables["batch_stats"]["norm0"]
    np.testing.assert_allclose(upd["batch_stats"]["norm0"]["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["norm0"]["var"], 0.9 * old["var"] + 0.1 * var * n / (n - 1),
                               rtol=1e-5)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("convnet3", dict(norm="instance"), (28, 28, 1)),
    ("resnet18", dict(stem="imagenet"), (32, 32, 3)),
])
def test_conv_implementations_agree(name, kwargs, shape):
    """The CPU convolutions (im2col, Winograd) and lax.conv compute the same model (same parameters)."""
    ref = create_model(name, 10, conv_impl="lax", **kwargs)
    variables = random_variables(ref, shape)
    x = normal(1, (2, *shape))
    expected = jax.jit(ref.apply)(variables, x)
    for impl in ("im2col", "winograd"):
        fast = create_model(name, 10, conv_impl=impl, **kwargs)
        np.testing.assert_allclose(jax.jit(fast.apply)(variables, x), expected, rtol=0,
                                   atol=1e-4 * np.abs(expected).max(), err_msg=impl)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_folded_first_block_trains_like_lax(norm):
    """A ConvNet on 1-channel images in training mode: the CPU path (the first convolution folded into
    its norm, Winograd after it) gives lax.conv's logits, parameter gradients and BN running statistics."""
    shape = (12, 12, 1)
    models = {impl: create_model("convnet3", 10, conv_impl=impl, norm=norm, width=8) for impl in ("lax", "auto")}
    variables = random_variables(models["lax"], shape)
    x, g = normal(2, (3, *shape)), normal(3, (3, 10))

    def run(model):
        def loss(params):
            out, upd = model.apply(dict(variables, params=params), x, train=True, mutable=["batch_stats"])
            return jnp.sum(out * g), (out, upd)
        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    (grads, (out, upd)), (ref_grads, (ref_out, ref_upd)) = run(models["auto"]), run(models["lax"])
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-4 * np.abs(ref_out).max())
    # A convolution's bias before a norm has no effect on the output: the first one's gradient is 0 folded;
    # the others' are round-off (~1e-6) on both sides, so gradients compare on the scale of the largest.
    assert np.all(np.asarray(grads["conv0"]["bias"]) == 0)
    assert bool(jax.tree.leaves(upd)) == (norm == "batch")  # running statistics only for batch norm
    for tree, ref in ((grads, ref_grads), (upd, ref_upd)):
        scale = max((float(np.abs(b).max()) for b in jax.tree.leaves(ref)), default=0.0)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)


def test_unknown_model_and_norm_are_errors():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg11", 10)
    with pytest.raises(ValueError, match="norm must be"):
        init_variables(create_model("convnet3", 10, norm="layer"), jax.random.key(0), (8, 8, 1))


def test_one_registry_entry_adds_a_model(monkeypatch, tmp_path):
    """A new model, registered once, is valid in configs, described in a teacher's model.json, built
    back from it, and converts to PyTorch names (by family)."""
    import ml_collections

    from configs.default import train_spec
    from wmdd_jax import models, teacher
    from wmdd_jax.config_check import check_train_spec
    from wmdd_jax.interop import key_map
    from wmdd_jax.models.resnet import ResNet

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    models.register_model("resnet10", functools.partial(ResNet, stage_sizes=(1, 1, 1, 1)), ("stem",))
    spec = train_spec(model="resnet10", stem="tiny", norm="batch")
    check_train_spec(ml_collections.ConfigDict({"teacher": spec}), "teacher")
    source = ml_collections.ConfigDict(dict(num_classes=3, image_shape=(16, 16, 3)))
    described = teacher._describe(spec, source)
    assert described == {"model": "resnet10", "stem": "tiny", "num_classes": 3, "image_shape": [16, 16, 3]}
    model = teacher.model_from_spec(spec, 3)
    assert model.stage_sizes == (1, 1, 1, 1) and model.stem == "tiny"
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (16, 16, 3)))
    keys = [e.torch_key for e in key_map(model, shapes)]
    assert "layer4.0.downsample.1.running_var" in keys and "layer4.1.conv1.weight" not in keys
    assert count(shapes["params"]) == sum(int(np.prod(e)) for e in [
        (64, 3, 3, 3), (64,), (64,), *[(c, c_in, 3, 3) for c, c_in in ((64, 64), (64, 64))], (64,), (64,), (64,), (64,),
        (128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1), *[(128,)] * 6,
        (256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), *[(256,)] * 6,
        (512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1), *[(512,)] * 6, (3, 512), (3,)])


def _spread_ok(values, std, n_sigmas=6.0):
    """Whether the sample std of ``values`` is ``std`` within ``n_sigmas`` of its sampling error.

    The sample variance of n draws has a relative standard error of sqrt((kurtosis - 1) / n): 0.89/sqrt(n)
    for a uniform (kurtosis 1.8), 1.41/sqrt(n) for a normal; the std's is half of it. Six of those,
    with the larger (normal) one: the bound is a property of the draw, not of this machine.
    """
    v = np.asarray(values, np.float64).ravel()
    return abs(v.std() / std - 1) <= n_sigmas * 0.71 / np.sqrt(v.size)


@pytest.mark.parametrize("weight_init", ["torch", "kaiming"])
def test_convnet_weight_init_draws_what_it_says(weight_init):
    """ConvNet-3 on 1-channel images: "torch" draws every convolution and classifier weight and bias
    from U(+-1/sqrt(fan_in)) (PyTorch's nn.Conv2d / nn.Linear defaults); "kaiming" (the earlier draw)
    kaiming-normal convolutions (truncated at 2 std by jax), a LeCun-normal classifier and zero biases."""
    model = create_model("convnet3", 10, norm="instance", weight_init=weight_init)
    params = init_variables(model, jax.random.key(3), (28, 28, 1))["params"]
    fans = {"conv0": 9 * 1, "conv1": 9 * 128, "conv2": 9 * 128, "classifier": 128 * 4 * 4}
    for name, fan_in in fans.items():
        kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
        if weight_init == "torch":
            bound = 1 / np.sqrt(fan_in)
            for w in (kernel, bias):
                assert np.abs(w).max() <= bound and np.abs(w).max() > bound * (1 - 20 / w.size), name
                assert _spread_ok(w, bound / np.sqrt(3)), name
        else:
            # jax's truncated normal is rescaled to keep the variance: std sqrt(gain / fan_in).
            std = np.sqrt((2.0 if name != "classifier" else 1.0) / fan_in)
            assert _spread_ok(kernel, std) and np.abs(kernel).max() <= 2 * std * 1.14, name
            assert np.all(bias == 0), name


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_resnet_torch_weight_init_is_torchvisions(stem):
    """A ResNet's weight_init="torch": convolutions N(0, 2 / (k * k * c_out)), not truncated (torchvision's
    kaiming_normal_, fan-out); the small-image stem U(+-1/sqrt(fan_in)) (a plain nn.Conv2d put in after
    torchvision's init); BatchNorm scale 1, bias 0; the classifier nn.Linear's U(+-1/sqrt(fan_in))."""
    from wmdd_jax.models.resnet import ResNet

    model = ResNet(num_classes=10, stage_sizes=(1, 1), stem=stem)
    params = init_variables(model, jax.random.key(1), (16, 16, 3))["params"]
    stem_kernel = np.asarray(params["conv1"]["kernel"])
    if stem == "imagenet":
        assert _spread_ok(stem_kernel, np.sqrt(2 / (7 * 7 * 64)))
    else:
        bound = 1 / np.sqrt(3 * 3 * 3)
        assert np.abs(stem_kernel).max() <= bound and _spread_ok(stem_kernel, bound / np.sqrt(3))
    for block, cin, cout in (("layer1_0", 64, 64), ("layer2_0", 64, 128)):
        for conv, k in (("conv1", 3), ("conv2", 3), ("downsample_conv", 1)):
            if conv not in params[block]:
                continue
            kernel = np.asarray(params[block][conv]["kernel"])
            std = np.sqrt(2 / (k * k * cout))
            assert kernel.shape[-1] == cout and _spread_ok(kernel, std), (block, conv)
            if kernel.size > 10_000:  # P(|z| > 3) = 0.27%: dozens of draws past 3 std; a 2-std truncation has none
                assert np.sum(np.abs(kernel) > 3 * std) > 10, (block, conv)
        for bn in ("bn1", "bn2"):
            assert np.all(np.asarray(params[block][bn]["scale"]) == 1)
            assert np.all(np.asarray(params[block][bn]["bias"]) == 0)
    bound = 1 / np.sqrt(128)
    for w in (params["fc"]["kernel"], params["fc"]["bias"]):
        assert np.abs(np.asarray(w)).max() <= bound and _spread_ok(w, bound / np.sqrt(3))
