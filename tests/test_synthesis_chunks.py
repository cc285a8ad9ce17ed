"""The synthesis gradient computed in class chunks and over devices equals the gradient of the whole loss.

The loss is a sum over the official batches (groups of whole classes), so a chunk or a device holding
whole groups computes its part alone (`wmdd_jax.distill.loss.synthesis_grad`); devices holding less than
a group add the groups' sums across devices (``spread``). Each case is compared with the loss and
gradient of all classes at once, computed by `synthesis_loss` on one device.
"""

import jax
import numpy as np
import pytest

from tests.conftest import CONV_IMPL, run_on_cpu_devices, tiny_config
from wmdd_jax import distill
from wmdd_jax.distill.loss import synthesis_grad
from wmdd_jax.models import create_model
from wmdd_jax.train_step import Teacher, init_variables

# float32 sums in another order (per chunk, per device): round-off of a few ulps of the loss parts.
RTOL = 1e-5


def problem(C, m, batch_size, per_class_bn=True, conv_impl=CONV_IMPL):
    """A tiny teacher, C classes of m images with targets; the last class is padding (mask 0)."""
    model = create_model("convnet3", C, norm="batch", width=4, conv_impl=conv_impl)
    teacher = Teacher(model, init_variables(model, jax.random.key(0), (8, 8, 1)))
    cfg = tiny_config().synthesis
    cfg.batch_size, cfg.per_class_bn = batch_size, per_class_bn
    cfg.crop_scale, cfg.jitter = (0.5, 1.0), 8  # random draws per class: they must not depend on the chunk
    rng = np.random.default_rng(1)
    images = rng.normal(size=(C, m, 8, 8, 1)).astype(np.float32)
    support = rng.normal(size=(C, m, 4)).astype(np.float32)
    shape = (C, 4) if per_class_bn else (4,)
    stat = lambda: {l: rng.uniform(size=shape).astype(np.float32) for l in ("norm0", "norm1", "norm2")}  # noqa
    targets = distill.Targets(support, stat(), stat())
    mask = np.ones(C, np.float32)
    mask[-1] = 0.0  # a padded class
    return model, teacher, cfg, images, targets, np.arange(C, dtype=np.int32), mask


def whole(model, teacher, cfg, images, targets, ids, mask):
    """The gradient and loss parts of all classes at once, on one device."""
    f = jax.value_and_grad(distill.synthesis_loss, has_aux=True)
    (_, parts), grads = jax.jit(lambda x: f(x, jax.random.key(5), teacher, targets, cfg, 8, ids, mask))(images)
    return np.asarray(grads), {k: float(v) for k, v in parts.items()}


@pytest.mark.parametrize("per_class_bn", [True, False])
def test_chunks_give_the_whole_gradient(per_class_bn):
    model, teacher, cfg, images, targets, ids, mask = problem(6, 2, 4, per_class_bn)  # groups of 2 classes
    ref_grads, ref_parts = whole(model, teacher, cfg, images, targets, ids, mask)
    grads, parts = jax.jit(lambda x: synthesis_grad(x, jax.random.key(5), teacher, targets, cfg, 8, ids, mask,
                                                    chunk=2))(images)
    for key, value in ref_parts.items():
        np.testing.assert_allclose(float(parts[key]), value, rtol=RTOL, err_msg=key)
    scale = np.abs(ref_grads).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(grads), ref_grads, atol=RTOL * scale)
    assert np.abs(np.asarray(grads)[-1]).max() == 0  # the padded class gets no gradient


def test_chunk_sizes_and_layouts():
    cfg = tiny_config().synthesis
    cfg.batch_size = 100
    # ImageNet-1K at IPC 10 on 16 devices: groups of 10 classes, 70 classes per device (1120 padded).
    assert distill.class_layout(cfg, 10, 1000, 16) == (10, False)
    # CPU: one chunk; elsewhere the official batch (100 images) unless chunk_images says otherwise.
    assert distill.loss.chunk_classes(cfg, 10, 70, 10, "cpu") == 70
    assert distill.loss.chunk_classes(cfg, 10, 70, 10, "tpu") == 10
    cfg.chunk_images = 350
    assert distill.loss.chunk_classes(cfg, 10, 70, 10, "tpu") == 10  # 30 does not divide 70; 10 does
    cfg.chunk_images = 700
    assert distill.loss.chunk_classes(cfg, 10, 70, 10, "gpu") == 70
    # Fewer classes than devices x group: spread evenly, groups summed across devices.
    assert distill.class_layout(cfg, 10, 10, 8) == (1, True)
    assert distill.class_layout(cfg, 50, 10, 8) == (1, True)
    assert distill.class_layout(cfg, 50, 16, 8) == (2, False)
    assert distill.class_layout(cfg, 10, 10, 1) == (10, False)


MULTI = """
import jax, numpy as np
from tests.test_synthesis_chunks import problem, whole
from wmdd_jax import distill
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
devices = np.asarray(jax.devices())
assert len(devices) == 4
out = {}
for name, (C, m, batch_size, chunk, spread) in {"aligned": (16, 2, 4, 2, False), "spread": (4, 1, 4, None, True)}.items():
    model, teacher, cfg, images, targets, ids, mask = problem(C, m, batch_size, conv_impl="winograd")
    ref_grads, ref_parts = whole(model, teacher, cfg, images, targets, ids, mask)
    mesh = Mesh(devices, ("classes",))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("classes")))
    grad = jax.jit(distill.synthesis_grad_fn(model, cfg, 8, mesh, chunk, spread))
    args = (put(images), jax.random.key(5), teacher.variables, jax.tree.map(put, targets), put(ids), put(mask))
    grads, parts = grad(*args)
    devices_used = len(grads.sharding.device_set)
    hlo = grad.lower(*args).compile().as_text()
    scale = np.abs(ref_grads).max()
    out[name] = dict(devices=devices_used, grad_gap=float(np.abs(np.asarray(grads) - ref_grads).max() / scale),
                     part_gap=max(abs(float(parts[k]) - v) / abs(v) for k, v in ref_parts.items()),
                     all_gather=hlo.count("all-gather"))
print("RESULT", out)
"""


def test_devices_give_the_whole_gradient():
    """4 simulated devices: whole groups per device (with chunks), and groups spread over devices."""
    done = run_on_cpu_devices(MULTI, 4)
    assert done.returncode == 0, done.stderr[-3000:]
    result = eval(done.stdout.split("RESULT", 1)[1])
    for name, r in result.items():
        assert r["devices"] == 4, (name, r)
        assert r["grad_gap"] < RTOL and r["part_gap"] < RTOL, (name, r)
        assert r["all_gather"] == 0, (name, r)  # no class array crosses devices
