"""PyTorch interop: converted weights give PyTorch's logits, statistics and features; files round-trip.

The PyTorch models (a ResNet-18 with torchvision's module names and the dataset-distillation
ConvNet, DC/DM) are in tests/torch_models.py, shared with tests/test_loss_parity.py.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch interop tests need the torch extra "
                                            "(.venv/bin/pip install torch==2.13.0, the CPU build on disk)")
tnn = torch.nn

from tests.conftest import tiny_config  # noqa: E402
from tests.torch_models import TorchConvNet, TorchResNet18, numpy_state, randomize  # noqa: E402
from wmdd_jax import distill, interop  # noqa: E402
from wmdd_jax.data import ArraySource, normalize  # noqa: E402
from wmdd_jax.errors import UserError  # noqa: E402
from wmdd_jax.image_sets import load_image_set  # noqa: E402
from wmdd_jax.interop.export import export  # noqa: E402
from wmdd_jax.models import create_model  # noqa: E402
from wmdd_jax.teacher import load_teacher  # noqa: E402
from wmdd_jax.train_step import Teacher, init_variables  # noqa: E402

RTOL = 1e-4  # logits, features and statistics: max |ours - torch| <= RTOL * max |torch|
# The ResNets run lax.conv: compiled in a fraction of the CPU default's (Winograd) time, and the
# kernel layout, hence the conversion, is the same for every implementation (tests/test_layers.py).
RESNET = dict(stem="small", conv_impl="lax")


def assert_close(ours, ref, rtol=RTOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * np.abs(ref).max())


def ours_from_torch(tmodel, model, image_shape):
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    return interop.from_torch(numpy_state(tmodel), model, shapes, image_shape)


def nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def logits(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(x))


def random_variables(model, image_shape, seed=0):
    """Random parameters and BN running statistics (positive variances), without running init."""
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    rng = np.random.default_rng(seed)
    out = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    out["batch_stats"] = jax.tree.map(lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32),
                                      shapes["batch_stats"])
    return out


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_resnet18_logits_match_pytorch(stem):
    torch.manual_seed(0)
    tmodel = TorchResNet18(7, stem)
    x = torch.randn(4, 3, 32, 32)
    randomize(tmodel, torch.randn(8, 3, 32, 32))
    model = create_model("resnet18", 7, **dict(RESNET, stem=stem))
    variables = ours_from_torch(tmodel, model, (32, 32, 3))
    with torch.no_grad():
        expected = tmodel(x).numpy()
    assert_close(logits(model, variables, x), expected)


@pytest.mark.parametrize("norm,im_size,channels", [
    ("instance", (32, 32), 3), ("batch", (32, 24), 3), ("none", (16, 16), 3),
    ("instance", (28, 28), 1),  # DC's Fashion-MNIST ConvNet: first conv padded by 3
])
def test_convnet_logits_match_pytorch(norm, im_size, channels):
    torch.manual_seed(1)
    tmodel = TorchConvNet(channels, 5, 16, 3, norm, im_size)
    x = torch.randn(6, channels, *im_size)
    randomize(tmodel, torch.randn(8, channels, *im_size))
    model = create_model("convnet3", 5, norm=norm, width=16)  # the default convolution (CPU: Winograd)
    variables = ours_from_torch(tmodel, model, (*im_size, channels))
    with torch.no_grad():
        expected = tmodel(x).numpy()
    assert_close(logits(model, variables, x), expected)


@pytest.mark.parametrize("name,kwargs,tmodel_fn", [
    ("resnet18", RESNET, lambda: TorchResNet18(4, "small")),
    ("convnet4", dict(norm="batch", width=8), lambda: TorchConvNet(3, 4, 8, 4, "batch", (32, 32))),
])
def test_round_trip_flax_torch_flax_is_exact(name, kwargs, tmodel_fn):
    model = create_model(name, 4, **kwargs)
    variables = random_variables(model, (32, 32, 3))
    state = interop.to_torch(variables, model, (32, 32, 3))
    tmodel = tmodel_fn()
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    back = interop.from_torch(numpy_state(tmodel), model, variables, (32, 32, 3))
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_file_becomes_the_teacher(tmp_path):
    """--config.teacher.checkpoint=model.pth: training-checkpoint dict, DataParallel prefix, extra entries."""
    config = tiny_config()
    config.teacher.first_padding = -1  # a DC-layout ConvNet (first conv padded by 3 on 1-channel images)
    model = create_model("convnet3", 10, norm="batch", width=8)
    variables = random_variables(model, (28, 28, 1), seed=3)
    state = interop.to_torch(variables, model, (28, 28, 1))
    path = str(tmp_path / "model.pth")
    torch.save({"epoch": 5, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}}, path)
    assert set(interop.load_torch_checkpoint(path)) == set(state)
    config.teacher.checkpoint = path
    teacher = load_teacher(config, str(tmp_path))
    assert teacher.model.norm == "batch" and teacher.model.width == 8
    for a, b in zip(jax.tree.leaves(teacher.variables), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    # A checkpoint holding a NaN is refused, not used to make NaN targets.
    state["features.0.weight"][0, 0, 0, 0] = np.nan
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    with pytest.raises(UserError, match=r"NaN or infinite values in .*conv0.*retrain it"):
        load_teacher(config, str(tmp_path))
    # A checkpoint of another architecture ends in one UserError naming the keys.
    config.teacher.width = 16
    with pytest.raises(UserError, match=r"width=16 .*features\.0\.weight is \[8, 1, 3, 3\], expected \[16, 1, 3, 3\]"):
        load_teacher(config, str(tmp_path))


def test_unknown_and_missing_keys_are_named():
    model = create_model("resnet18", 10, **RESNET)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (32, 32, 3)))
    state = interop.to_torch(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), model)
    del state["layer2.0.downsample.1.running_var"]
    state["layer2.0.shortcut.0.weight"] = np.zeros((128, 64, 1, 1), np.float32)
    with pytest.raises(UserError) as e:
        interop.from_torch(state, model, shapes)
    assert "missing keys: layer2.0.downsample.1.running_var" in str(e.value)
    assert "unexpected keys: layer2.0.shortcut.0.weight" in str(e.value)
    # DC's ConvNet on 1-channel 28x28 images pads its first conv by 3: into a model padding by 1,
    # a clear refusal, not wrong numbers (the default first_padding=-1 follows DC and loads it).
    tmodel = TorchConvNet(1, 10, 8, 3, "instance", (28, 28))
    ours = create_model("convnet3", 10, norm="instance", width=8, first_padding=1)
    shapes = jax.eval_shape(lambda: init_variables(ours, jax.random.key(0), (28, 28, 1)))
    with pytest.raises(UserError, match="pads its first convolution by 3"):
        interop.from_torch(numpy_state(tmodel), ours, shapes, (28, 28, 1))


# --------------------------------------------------------------------------- what WMDD's loss uses


@pytest.mark.parametrize("name,kwargs,tmodel_fn,head,shape", [
    ("resnet18", RESNET, lambda: TorchResNet18(3, "small"), "fc", (16, 16, 3)),
    ("convnet3", dict(norm="batch", width=16), lambda: TorchConvNet(3, 3, 16, 3, "batch", (16, 16)),
     "classifier", (16, 16, 3)),
])
def test_class_statistics_and_features_match_pytorch_hooks(name, kwargs, tmodel_fn, head, shape):
    """Per-class mean / biased variance of every BN layer's input, and penultimate features."""
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    tmodel = randomize(tmodel_fn(), torch.randn(8, shape[2], *shape[:2]))
    model = create_model(name, 3, **kwargs)
    teacher = Teacher(model, ours_from_torch(tmodel, model, shape))
    labels = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1, 0, 2, 2], np.int32)
    images = rng.uniform(0, 1, (len(labels), *shape)).astype(np.float32)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    source = ArraySource(images, labels, 3, mean, std)
    stats = distill.class_statistics(teacher, source, batch_size=len(labels), verbose=False)

    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].double()))
             for n, m in tmodel.named_modules() if isinstance(m, tnn.BatchNorm2d) or n == head]
    x = torch.from_numpy(normalize(images, mean, std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        tmodel(x)
    for h in hooks:
        h.remove()
    assert len(stats.bn_mean) == len(inputs) - 1
    for layer in stats.bn_mean:
        t = inputs[interop.torch_module_name(model, layer)]
        for k in range(3):
            tk = t[torch.from_numpy(labels == k)]
            assert_close(stats.bn_mean[layer][k], tk.mean((0, 2, 3)).numpy())
            assert_close(stats.bn_var[layer][k], tk.var((0, 2, 3), unbiased=False).numpy())
    features = inputs[head].numpy()
    if name.startswith("convnet"):  # torch flattens (c, y, x), we flatten (y, x, c)
        c, hw = kwargs["width"], features.shape[1] // kwargs["width"]
        features = features.reshape(-1, c, hw).transpose(0, 2, 1).reshape(len(features), -1)
    for k in range(3):
        assert_close(stats.features[k], features[source.class_indices(k)])


# --------------------------------------------------------------------------- image sets


def like(shape, classes=3):
    mean, std = ((0.5,), (0.25,)) if shape[-1] == 1 else ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    return ArraySource(np.zeros((1, *shape), np.uint8), np.zeros(1), classes, mean, std)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_folder_round_trip_is_identical(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 10, 12, channels)).astype(np.float32) / 255.0
    labels = np.array([2, 0, 1, 0, 2, 2, 0])
    weights = rng.uniform(0.1, 2.0, 7).astype(np.float32)
    folder = str(tmp_path / "set")
    names = interop.write_image_folder(folder, images, labels, weights, method="wmdd")
    assert names[:3] == ["new002/class002_id000.png", "new000/class000_id000.png", "new001/class001_id000.png"]
    assert sorted(os.listdir(folder)) == ["new000", "new001", "new002", "wmdd_meta.json"]
    back = interop.read_image_folder(folder)
    order = np.argsort(labels, kind="stable")  # read back class by class, ids in order
    np.testing.assert_array_equal(back.images, images[order])
    np.testing.assert_array_equal(back.labels, labels[order])
    np.testing.assert_array_equal(back.weights, weights[order])
    assert back.method == "wmdd"
    # Through evaluate's loader, as --config.eval.source=FOLDER does.
    data, w, method = load_image_set(folder, like(images.shape[1:]))
    np.testing.assert_array_equal(data.images, images[order])
    assert method == "wmdd" and np.array_equal(w, weights[order])


def test_official_jpeg_folder_is_read(tmp_path):
    """The PyTorch recover step's output: uint8(x * 255) JPEGs in new{k:03d}/class{k:03d}_id{i:03d}.jpg."""
    from PIL import Image

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (2, 4, 8, 8, 3))
    for k in range(2):
        os.makedirs(tmp_path / f"new{k:03d}")
        for i in (0, 2, 1, 3):
            Image.fromarray((x[k, i] * 255).astype(np.uint8)).save(tmp_path / f"new{k:03d}/class{k:03d}_id{i:03d}.jpg")
    data, weights, method = load_image_set(str(tmp_path), like((8, 8, 3), classes=2))
    decoded = [np.asarray(Image.open(tmp_path / f"new{k:03d}/class{k:03d}_id{i:03d}.jpg"))
               for k in range(2) for i in range(4)]
    np.testing.assert_array_equal(data.images, np.stack(decoded) / np.float32(255))
    np.testing.assert_array_equal(data.labels, np.repeat([0, 1], 4))
    assert method == "pytorch" and np.all(weights == 1)
    with pytest.raises(UserError, match=r"are \(8, 8, 3\), the dataset's are \(9, 9, 3\)"):
        load_image_set(str(tmp_path), like((9, 9, 3), classes=2))


def test_tensor_files_are_read(tmp_path):
    ref = like((6, 5, 3))
    rng = np.random.default_rng(2)
    images = rng.uniform(-0.1, 1.1, (6, 6, 5, 3)).astype(np.float32)  # not clipped: kept as PyTorch saw them
    labels = np.array([0, 1, 2, 0, 1, 2])
    normalised = torch.from_numpy(normalize(images, ref.mean, ref.std).transpose(0, 3, 1, 2).copy())
    tlabels = torch.from_numpy(labels)
    layouts = {
        "dict.pt": {"images": normalised, "labels": tlabels},
        "dm_result.pt": {"data": [[normalised, tlabels]], "accs_all_exps": {"ConvNet": [0.5]}},
        "pair.pt": (normalised, tlabels),
        "images_best.pt": normalised,  # MTT, labels in labels_best.pt
    }
    torch.save(tlabels, tmp_path / "labels_best.pt")
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        data, weights, method = load_image_set(str(tmp_path / name), ref)
        np.testing.assert_allclose(data.images, images, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(data.labels, labels)
        assert method == "pytorch" and np.all(weights == 1)
    # Ours written, read back (a folder holding one .pt file works too).
    (tmp_path / "ours").mkdir()
    interop.write_tensor_file(str(tmp_path / "ours" / "set.pt"), images, labels, ref.mean, ref.std,
                              weights=np.arange(6.0), method="wmdd")
    data, weights, method = load_image_set(str(tmp_path / "ours"), ref)
    np.testing.assert_allclose(data.images, images, rtol=0, atol=1e-6)
    assert method == "wmdd" and np.array_equal(weights, np.arange(6.0))


def test_export_stage_writes_what_pytorch_reads(tmp_path):
    config = tiny_config()
    workdir = tmp_path / "run"
    (workdir / "synthetic").mkdir(parents=True)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (20, 28, 28, 1)).astype(np.float32) / 255
    labels = np.repeat(np.arange(10), 2)
    np.savez(workdir / "synthetic" / "images.npz", images=images, labels=labels, weights=np.ones(20),
             method="wmdd")
    model = create_model("convnet3", 10, norm="batch", width=8, first_padding=config.teacher.first_padding)
    state = interop.to_torch(random_variables(model, (28, 28, 1)), model, (28, 28, 1))
    config.teacher.checkpoint = str(tmp_path / "teacher_in.pth")
    interop.save_torch_checkpoint(config.teacher.checkpoint, state)
    written = export(config, str(workdir))
    assert [os.path.relpath(p, workdir) for p in written] == [
        "pytorch/images", "pytorch/images.pt", "pytorch/teacher.pth"]
    exported = interop.load_torch_checkpoint(written[2])
    assert list(exported) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value)
    with open(workdir / "pytorch" / "images" / "wmdd_meta.json") as f:
        assert json.load(f)["method"] == "wmdd"
    source = like((28, 28, 1), classes=10)
    for path in written[:2]:
        data, _, method = load_image_set(path, source)
        np.testing.assert_allclose(data.images, images, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(data.labels, labels)
        assert method == "wmdd"


def test_torch_weight_init_matches_a_fresh_pytorch_convnet():
    """A fresh ConvNet-3 (weight_init="torch", the default) against a fresh DC/DM ConvNet of PyTorch, tensor
    by tensor in PyTorch's names and layout: the same bound and spread (both U(+-1/sqrt(fan_in)) for
    every conv and linear weight and bias), the norms' scales 1 and biases 0 on both sides."""
    model = create_model("convnet3", 10, norm="instance")
    ours = interop.to_torch(init_variables(model, jax.random.key(0), (28, 28, 1)), model, (28, 28, 1))
    torch.manual_seed(0)
    theirs = numpy_state(TorchConvNet(1, 10, 128, 3, "instance", (28, 28)))
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        o = np.asarray(ours[key], np.float64)
        assert o.shape == t.shape, key
        if t.std() == 0:
            np.testing.assert_array_equal(o, t, err_msg=key)
            continue
        # Two independent U(-b, b) samples of n: each std has a relative sampling error of 0.45/sqrt(n),
        # their ratio 0.63/sqrt(n); 6 of those. Each max is b(1 - O(1/n)). Kaiming's convolutions (2.45x
        # the std) and zero biases fall far outside both.
        n, b = t.size, np.abs(t).max()
        assert abs(o.std() / t.std() - 1) <= 6 * 0.63 / np.sqrt(n), key
        assert b * (1 - 20 / n) <= np.abs(o).max() <= b * (1 + 20 / n), key
