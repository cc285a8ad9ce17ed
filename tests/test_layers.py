"""The layers against slow exact references: lax.conv, textbook normalisation, reshape pooling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax.models import layers, norms

RTOL = 1e-4  # relative to the largest magnitude of the reference


def normal(seed, shape, scale=1.0, shift=0.0):
    """float32 Gaussian test data from NumPy: a jax.random draw of a new shape compiles (seconds on CPU)."""
    return (scale * np.random.default_rng(seed).normal(size=shape) + shift).astype(np.float32)


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(actual / scale, expected / scale, atol=rtol)


def lax_conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def value_and_grads(f, x, kernel):
    """Output and the gradients of <output, fixed random cotangent> w.r.t. x and kernel.

    Jitted: one compile, where op-by-op execution compiles every primitive of the backward alone.
    The cotangent comes from NumPy: drawn inside, its random bits would take most of the compile.
    """
    g = normal(7, jax.eval_shape(f, x, kernel).shape)

    @jax.jit
    def run(x, kernel, g):
        y, vjp = jax.vjp(f, x, kernel)
        return (y,) + vjp(g)

    return run(x, kernel, g)


CONV_CASES = [
    # (input shape, kernel size, stride, padding): strides 1 and 2, padding 0 to 3, odd and non-square
    # maps, 1x1 (one slice) to 7x7 kernels. The common 3x3 stride-1 padding-1 case is the module test's.
    ((2, 9, 7, 4), 3, 2, 1),
    ((1, 10, 10, 2), 5, 1, 2),
    ((2, 7, 7, 3), 1, 1, 0),
    ((1, 12, 11, 3), 7, 2, 3),
    ((2, 6, 6, 5), 3, 1, 0),
    # Patches of at most layers.NARROW values take narrow_matmul: 1 channel (9), 3 channels strided (27).
    ((2, 9, 7, 1), 3, 1, 3),
    ((2, 8, 8, 3), 3, 2, 1),
]


@pytest.mark.parametrize("shape,k,stride,padding", CONV_CASES)
def test_im2col_conv_matches_lax_conv(shape, k, stride, padding):
    x, kernel = normal(0, shape), normal(1, (k, k, shape[-1], 6))
    got = value_and_grads(lambda a, b: layers.im2col_conv(a, b, stride, padding), x, kernel)
    want = value_and_grads(lambda a, b: lax_conv(a, b, stride, padding), x, kernel)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("per_image", [False, True])
def test_narrow_matmul_matches_matmul(per_image):
    # Values and both gradients against the einsum it replaces; bfloat16 inputs give a bfloat16 result
    # rounded once from float32 sums.
    p = normal(4, (3, 20, 9))
    k = normal(5, (3, 9, 7) if per_image else (9, 7))
    spec = "nst,ntc->nsc" if per_image else "nst,tc->nsc"
    g = normal(6, (3, 20, 7))

    def run(f):
        return jax.jit(lambda p, k: (lambda y, vjp: (y,) + vjp(g))(*jax.vjp(f, p, k)))(p, k)

    for a, b in zip(run(layers.narrow_matmul), run(lambda p, k: jnp.einsum(spec, p, k, precision="highest"))):
        assert_close(a, b, rtol=1e-5)
    p16, k16 = jnp.asarray(p, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    y16 = layers.narrow_matmul(p16, k16)
    want = np.einsum(spec, np.asarray(p16, np.float64), np.asarray(k16, np.float64))
    assert y16.dtype == jnp.bfloat16
    # One bfloat16 rounding of the exact sum (relative 2^-9, 2^-8 with float32's own error), not nine.
    np.testing.assert_allclose(np.asarray(y16, np.float64), want, rtol=2 ** -8, atol=1e-5)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape,padding", [
    ((2, 16, 16, 16), 1),   # whole 2x2 and 4x4 tiles
    ((3, 7, 7, 8), 1),      # odd map: the last tile is cropped
    ((2, 10, 6, 8), 1),     # 4x4 tiles: the last row of tiles half cropped
    ((2, 9, 6, 8), 0),
    ((2, 5, 8, 8), 2),
    ((1, 1, 1, 8), 1),
])
def test_winograd_conv_matches_lax_conv(shape, padding, tile):
    x, kernel = normal(2, shape, shift=0.5), normal(3, (3, 3, shape[-1], 5))
    got = value_and_grads(lambda a, b: layers.winograd_conv(a, b, padding, tile), x, kernel)
    want = value_and_grads(lambda a, b: lax_conv(a, b, 1, padding), x, kernel)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_winograd_conv_second_order():
    """Gradients of gradients (the backward is itself differentiable) agree with lax.conv."""
    x, kernel = normal(4, (1, 6, 6, 8)), normal(5, (3, 3, 8, 4))

    def grad_norm(conv):
        return jax.grad(lambda k: jnp.sum(jnp.square(jax.grad(lambda a: jnp.sum(jnp.sin(conv(a, k))))(x))))

    assert_close(jax.jit(grad_norm(lambda a, k: layers.winograd_conv(a, k, 1)))(kernel),
                 jax.jit(grad_norm(lambda a, k: lax_conv(a, k, 1, 1)))(kernel))


@pytest.mark.parametrize("impl", ["winograd", "im2col"])
@pytest.mark.parametrize("k,stride,padding,cin", [(3, 1, 1, 16), (3, 1, 1, 1), (3, 2, 1, 8)])
def test_conv_module_implementations_share_parameters(impl, k, stride, padding, cin):
    x = normal(6, (2, 8, 8, cin))
    ref = layers.Conv(6, k, stride, padding, conv_impl="lax")
    shapes = jax.eval_shape(ref.init, jax.random.PRNGKey(5), x)  # the layout, without compiling an init
    variables = jax.tree_util.tree_map(lambda v: normal(7, v.shape, shift=0.1), shapes)  # non-zero bias
    assert variables["params"]["kernel"].shape == (k, k, cin, 6)
    conv = layers.Conv(6, k, stride, padding, conv_impl=impl)
    assert_close(jax.jit(conv.apply)(variables, x), jax.jit(ref.apply)(variables, x))


def test_auto_conv_matches_lax_and_avoids_xla_conv_on_cpu():
    """``conv_impl="auto"`` computes lax.conv's output; on CPU (the reason it exists) its program holds
    none of XLA's convolutions, elsewhere it is lax.conv. An unknown name is refused, naming the option."""
    x = normal(6, (2, 8, 8, 16))
    ref = layers.Conv(6, 3, 1, 1, conv_impl="lax")
    shapes = jax.eval_shape(ref.init, jax.random.PRNGKey(5), x)
    variables = jax.tree_util.tree_map(lambda v: normal(7, v.shape, shift=0.1), shapes)
    auto = layers.Conv(6, 3, 1, 1, conv_impl="auto")
    assert_close(jax.jit(auto.apply)(variables, x), jax.jit(ref.apply)(variables, x))
    program = str(jax.make_jaxpr(auto.apply)(variables, x))
    assert ("conv_general_dilated" in program) == (jax.default_backend() != "cpu"), program
    assert "conv_general_dilated" in str(jax.make_jaxpr(ref.apply)(variables, x))  # the probe sees one
    with pytest.raises(ValueError, match="conv_impl must be 'auto', 'winograd', 'im2col' or 'lax', got 'fft'"):
        layers.Conv(6, conv_impl="fft").init(jax.random.PRNGKey(5), x)


def reference_norm(x, scale, bias, axes, eps=1e-5):
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


def test_instance_norm_matches_reference():
    x = normal(8, (3, 5, 4, 6), 3.0, 2.0)
    norm = norms.InstanceNorm()
    scale = jnp.linspace(0.5, 1.5, 6)
    bias = jnp.linspace(-1.0, 1.0, 6)
    variables = {"params": {"scale": scale, "bias": bias}}
    assert_close(norm.apply(variables, x), reference_norm(x, scale, bias, (1, 2)))


@pytest.mark.parametrize("shape,stride,padding", [
    ((3, 28, 28, 1), 1, 3),   # DC's first layer for 1-channel images
    ((2, 9, 7, 3), 1, 1),     # 3 channels (27 patch values), odd, non-square
    ((2, 10, 10, 2), 2, 1),   # strided
])
def test_conv_instance_norm_equals_the_norm_of_the_convolution(shape, stride, padding):
    """The fused first block (`conv_instance_norm`) against InstanceNorm(lax.conv(x) + bias): outputs and
    the gradients to the input, kernel, scale and bias; the convolution's bias has none in either form."""
    x, kernel = normal(10, shape, 2.0, 0.5), normal(11, (3, 3, shape[-1], 7))
    scale, bias, conv_bias = normal(12, (7,), 0.3, 1.0), normal(13, (7,)), normal(14, (7,))
    g = normal(15, jax.eval_shape(lambda: lax_conv(x, kernel, stride, padding)).shape)

    def unfused(x, kernel, scale, bias, conv_bias):
        variables = {"params": {"scale": scale, "bias": bias}}
        return norms.InstanceNorm().apply(variables, lax_conv(x, kernel, stride, padding) + conv_bias)

    def fused(x, kernel, scale, bias, conv_bias):
        return norms.conv_instance_norm(x, kernel, stride, padding, scale, bias)

    def run(f):
        return jax.jit(lambda *a: (lambda y, vjp: (y,) + vjp(g))(*jax.vjp(f, *a)))(x, kernel, scale, bias, conv_bias)

    got, want = run(fused), run(unfused)
    for a, b in zip(got[:-1], want[:-1]):
        assert_close(a, b)
    assert np.all(np.asarray(got[-1]) == 0)
    assert float(np.abs(want[-1]).max()) < 1e-3 * float(np.abs(want[1]).max())  # round-off only


def test_conv_batch_norm_equals_batch_norm_of_the_convolution():
    """The fused first block in training mode (`conv_batch_norm`) against BatchNorm(lax.conv(x) + bias):
    outputs, the batch statistics the running averages take (the bias in the mean) and the gradients;
    the convolution's bias gets none in either form."""
    x, kernel = normal(16, (4, 9, 8, 1), 2.0, 0.5), normal(17, (3, 3, 1, 6))
    scale, bias, conv_bias = normal(18, (6,), 0.3, 1.0), normal(19, (6,)), normal(20, (6,))
    g = normal(21, (4, 11, 10, 6))
    variables = {"batch_stats": {"mean": normal(22, (6,)), "var": normal(23, (6,), 0.1, 1.0) ** 2}}

    def unfused(x, kernel, scale, bias, conv_bias):
        v = dict(variables, params={"scale": scale, "bias": bias})
        return norms.BatchNorm().apply(v, lax_conv(x, kernel, 1, 2) + conv_bias, mutable=["batch_stats"])

    def fused(x, kernel, scale, bias, conv_bias):
        v = dict(variables, params={"scale": scale, "bias": bias})
        return norms.BatchNorm().apply(v, x, conv=(kernel, conv_bias, 1, 2), mutable=["batch_stats"])

    def run(f):
        def with_grads(*a):
            (y, stats), vjp = jax.vjp(f, *a)
            return (y, stats) + vjp((g, jax.tree.map(jnp.zeros_like, stats)))
        return jax.jit(with_grads)(x, kernel, scale, bias, conv_bias)

    got, want = run(fused), run(unfused)
    assert_close(got[0], want[0])
    for k in ("mean", "var"):
        assert_close(got[1]["batch_stats"][k], want[1]["batch_stats"][k])
    for a, b in zip(got[2:-1], want[2:-1]):
        assert_close(a, b)
    assert np.all(np.asarray(got[-1]) == 0)
    assert float(np.abs(want[-1]).max()) < 1e-3 * float(np.abs(want[3]).max())  # round-off only


def test_batch_norm_train_matches_reference_and_updates_like_pytorch():
    x = normal(9, (4, 3, 5, 6), 2.0, -1.0)
    bn = norms.BatchNorm(use_running_average=False, momentum=0.1)
    variables = bn.init(jax.random.PRNGKey(0), x)
    y, state = bn.apply(variables, x, mutable=["batch_stats"])
    assert_close(y, reference_norm(x, np.ones(6), np.zeros(6), (0, 1, 2)))
    x64 = np.asarray(x, np.float64).reshape(-1, 6)
    assert_close(state["batch_stats"]["mean"], 0.1 * x64.mean(0))
    assert_close(state["batch_stats"]["var"], 0.9 + 0.1 * x64.var(0, ddof=1))


@pytest.mark.parametrize("axes", [(1, 2), (0, 1, 2)])
def test_normalize_gradients_match_autodiff(axes):
    """The hand-written backward equals autodiff of the textbook formula, for all three outputs."""
    x, scale, bias = normal(10, (4, 5, 5, 6), 3.0, 2.0), normal(11, (6,)), normal(12, (6,))

    def textbook(x, scale, bias):
        mean = x.mean(axis=axes, keepdims=True)
        var = jnp.square(x - mean).mean(axis=axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    cotangents = tuple(normal(13 + i, o.shape) for i, o in enumerate(jax.eval_shape(textbook, x, scale, bias)))

    @functools.partial(jax.jit, static_argnums=0)
    def outputs_and_grads(f, x, scale, bias):
        out, vjp = jax.vjp(f, x, scale, bias)
        return out + vjp(cotangents)

    got = outputs_and_grads(lambda *a: norms._normalize(*a, axes, 1e-5), x, scale, bias)
    for a, b in zip(got, outputs_and_grads(textbook, x, scale, bias)):
        assert_close(a, b)


def test_batch_norm_sows_per_sample_moments():
    x = normal(16, (3, 4, 4, 5), shift=1.0)
    bn = norms.BatchNorm(use_running_average=True)
    variables = bn.init(jax.random.PRNGKey(0), x)
    _, state = bn.apply(variables, x, mutable=[norms.BN_STATS])
    (mean, var), = norms.collect_bn_moments(state).values()
    x64 = np.asarray(x, np.float64)
    assert_close(mean, x64.mean(axis=(1, 2)))
    assert_close(var, x64.var(axis=(1, 2)))
    mu, sigma2 = norms.pooled_moments(mean, var)
    assert_close(mu, x64.mean(axis=(0, 1, 2)))
    assert_close(sigma2, x64.var(axis=(0, 1, 2)))


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 9, 3)])
def test_avg_pool2_matches_reference(shape):
    x = normal(17, shape)
    n, h, w, c = shape
    x64 = np.asarray(x, np.float64)[:, : h // 2 * 2, : w // 2 * 2]
    want = x64.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    assert_close(layers.avg_pool2(x), want)
