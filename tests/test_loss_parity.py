"""The synthesis loss against an independent PyTorch port of the official WMDD loss.

The official recover step (docs/method.md, "Synthesis") on one batch of whole classes k, images s:
  r_wb CE(f(s), k) + ||h(s) - b||_F + r_bn sum_l c_l mean_k (||sigma2_lk - var_k|| + ||mu_lk - mean_k||),
with the BN layers' inputs taken by forward hooks on the ``nn.BatchNorm2d`` modules, as the
official code takes them, and the loss summed over the official batches of ``batch_size`` images.
Both sides run the same teacher (converted by `wmdd_jax.interop`) on the same un-augmented images
with the same targets; each loss part, the total and the pixel gradient must agree.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch parity tests need the torch extra "
                                            "(.venv/bin/pip install torch==2.13.0, the CPU build on disk)")

from tests.conftest import CONV_IMPL, tiny_config  # noqa: E402
from tests.torch_models import TorchConvNet, numpy_state, randomize  # noqa: E402
from wmdd_jax import distill, interop  # noqa: E402
from wmdd_jax.models import create_model  # noqa: E402
from wmdd_jax.train_step import Teacher, init_variables  # noqa: E402

SHAPE = (28, 28, 1)   # Fashion-MNIST: the first convolution pads by 3, a 4x4 map after three pools
WIDTH = 16
NUM_CLASSES = 5       # the teacher's; the synthetic classes are a few of them
# >10x the measured float32 spread (3 runs, 10 seeds x 2 noise levels): parts 7.3e-7 rel., 1 - cos 2e-11.
# The Winograd F(4x4, 3x3) convolution of CPU runs (the 4 cases below): parts 4.6e-7, 1 - cos 3.5e-12,
# pixel gradients 3.5e-6 max-relative (lax: 1.5e-6).
RTOL = 1e-5
MIN_COSINE = 0.99999
PARTS = ("ce", "feature", "bn", "total")


def torch_layout(features):
    """Our features [n, y * x * c] flatten (y, x, c); PyTorch's ConvNet flattens (c, y, x)."""
    n, d = features.shape
    return features.reshape(n, d // WIDTH, WIDTH).transpose(0, 2, 1).reshape(n, d)


def official_batch_loss(tmodel, x, labels, support, bn_mean, bn_var, cfg):
    """One official batch of whole classes, in PyTorch.

    Args:
      x: [g * m, ch, h, w] images, class by class (m per class), with ``requires_grad``.
      labels: [g] the batch's classes; support: [g * m, d] barycenter points in PyTorch's layout.
      bn_mean, bn_var: PyTorch BN module name -> [g, ch] the classes' real-data statistics.
    Returns:
      dict of scalar tensors: ce, feature, bn, total.
    """
    g = len(labels)
    inputs, features = {}, []
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: inputs.__setitem__(n, a[0]))
             for n, m in tmodel.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks.append(tmodel.classifier.register_forward_hook(lambda m, a, out: features.append(a[0])))
    logits = tmodel(x)
    for h in hooks:
        h.remove()
    ce = torch.nn.functional.cross_entropy(logits, labels.repeat_interleave(len(x) // g))
    feature = torch.norm(features[0] - support, 2)  # Frobenius norm of the whole batch, not squared
    bn = 0.0
    for i, (name, t) in enumerate(inputs.items()):
        t = t.reshape(g, -1, *t.shape[1:])                 # [g, m, ch, h, w]
        mean = t.mean((1, 3, 4))
        var = t.var((1, 3, 4), unbiased=False)
        r = torch.norm(bn_var[name] - var, dim=1).mean() + torch.norm(bn_mean[name] - mean, dim=1).mean()
        bn = bn + (cfg.first_bn_multiplier if i == 0 else 1.0) * r
    total = cfg.r_wb * ce + feature + cfg.r_bn * bn
    return dict(ce=ce, feature=feature, bn=bn, total=total)


def official_loss(tmodel, images, class_ids, support, bn_mean, bn_var, cfg):
    """The official loss over batches of ``min(batch_size // m, C)`` classes (the last may have fewer).

    images: [C, m, h, w, ch] normalised pixels. Returns (parts summed over the batches as float64,
    pixel gradient of the total [C, m, h, w, ch]).
    """
    C, m = images.shape[:2]
    per_batch = min(int(cfg.batch_size) // m, C)
    x = torch.from_numpy(images.transpose(0, 1, 4, 2, 3).copy()).requires_grad_(True)  # NCHW per image
    sums = dict.fromkeys(PARTS, 0.0)
    for start in range(0, C, per_batch):
        sl = slice(start, min(start + per_batch, C))
        parts = official_batch_loss(
            tmodel, x[sl].flatten(0, 1), torch.from_numpy(class_ids[sl]).long(),
            torch.from_numpy(torch_layout(support[sl].reshape(-1, support.shape[-1]))),
            {n: torch.from_numpy(v[sl]) for n, v in bn_mean.items()},
            {n: torch.from_numpy(v[sl]) for n, v in bn_var.items()}, cfg)
        parts["total"].backward()
        sums = {k: sums[k] + parts[k].item() for k in PARTS}
    return sums, x.grad.numpy().transpose(0, 1, 3, 4, 2)  # back to NHWC


def real_targets(tmodel, model, class_ids, m, rng):
    """The statistics stage in PyTorch on stand-in real images (a per-class brightness and noise).

    Returns our ``Targets`` (support in our feature layout, statistics under our layer names) and
    the same statistics under PyTorch's module names.
    """
    n_real = 3 * m
    real = rng.normal(0, 1, (len(class_ids), n_real, *SHAPE)).astype(np.float32)
    real += np.asarray(class_ids, np.float32)[:, None, None, None, None] * 0.3 - 0.5
    inputs, features = {}, []
    hooks = [mod.register_forward_hook(lambda mod, a, out, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, mod in tmodel.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    hooks.append(tmodel.classifier.register_forward_hook(lambda mod, a, out: features.append(a[0])))
    with torch.no_grad():
        for k in range(len(class_ids)):
            tmodel(torch.from_numpy(real[k].transpose(0, 3, 1, 2).copy()))
    for h in hooks:
        h.remove()
    t_mean = {n: torch.stack([t.mean((0, 2, 3)) for t in v]).numpy() for n, v in inputs.items()}
    t_var = {n: torch.stack([t.var((0, 2, 3), unbiased=False) for t in v]).numpy() for n, v in inputs.items()}
    # Barycenter stand-ins: features of real images of the class, moved a little.
    f = torch.stack(features).numpy()[:, :m]                                 # [C, m, d] PyTorch layout
    f = f + 0.1 * rng.normal(0, 1, f.shape).astype(np.float32) * np.abs(f).mean()
    d = f.shape[-1]
    support = f.reshape(-1, WIDTH, d // WIDTH).transpose(0, 2, 1).reshape(f.shape)  # our (y, x, c) layout
    name = {interop.torch_module_name(model, layer): layer for layer in ("norm0", "norm1", "norm2")}
    targets = distill.Targets(support, {name[n]: v for n, v in t_mean.items()},
                              {name[n]: v for n, v in t_var.items()})
    return targets, t_mean, t_var, real


@pytest.mark.parametrize("C,m,batch_size", [
    (3, 4, 12),   # all classes in one official batch
    (4, 2, 4),    # two official batches of two classes each
    (3, 2, 4),    # the last official batch holds fewer classes (1 of 2)
    (3, 1, 8),    # fewer classes than an official batch holds, as at IPC 1 on 10 classes
])
@pytest.mark.parametrize("conv_impl", [CONV_IMPL, "winograd"])
def test_loss_and_pixel_gradient_match_the_official_pytorch_loss(C, m, batch_size, conv_impl):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    h, w, ch = SHAPE
    tmodel = randomize(TorchConvNet(ch, NUM_CLASSES, WIDTH, 3, "batch", (h, w)),
                       torch.randn(16, ch, h, w))
    model = create_model("convnet3", NUM_CLASSES, norm="batch", width=WIDTH, conv_impl=conv_impl)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), SHAPE))
    teacher = Teacher(model, interop.from_torch(numpy_state(tmodel), model, shapes, SHAPE))
    class_ids = np.arange(NUM_CLASSES - C, NUM_CLASSES, dtype=np.int32)  # labels other than positions
    targets, t_mean, t_var, real = real_targets(tmodel, model, class_ids, m, rng)
    # Synthetic images: real ones of the class with noise on top (the loss mid-way, every term alive).
    images = (real[:, :m] + 0.5 * rng.normal(0, 1, real[:, :m].shape)).astype(np.float32)

    cfg = tiny_config().synthesis
    cfg.crop_scale, cfg.flip, cfg.jitter = None, False, 0  # un-augmented: the official loss on the images
    cfg.batch_size, cfg.r_wb, cfg.r_bn, cfg.first_bn_multiplier = batch_size, 0.7, 3.0, 2.5
    cfg.per_class_bn, cfg.use_barycenter = True, True

    def loss(x):
        return distill.synthesis_loss(x, jax.random.key(0), teacher, targets, cfg, h, class_ids)

    (total, parts), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(images)
    ours = dict(parts, total=total)
    ref, ref_grad = official_loss(tmodel, images, class_ids, targets.support, t_mean, t_var, cfg)

    a, b = np.asarray(grad, np.float64).ravel(), ref_grad.astype(np.float64).ravel()
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    rel = {k: abs(float(ours[k]) / ref[k] - 1) for k in PARTS}
    print(f"relative differences {rel}; 1 - gradient cosine {1 - cosine:.1e}, max |ours - torch| / max |torch| "
          f"{np.abs(a - b).max() / np.abs(b).max():.2e}, norm-wise {np.linalg.norm(a - b) / np.linalg.norm(b):.2e}")
    for k in PARTS:
        np.testing.assert_allclose(float(ours[k]), ref[k], rtol=RTOL, err_msg=k)
    assert cosine > MIN_COSINE
