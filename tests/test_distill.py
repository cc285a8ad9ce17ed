"""Distillation: exact class statistics, the synthesis objective, resume, stored soft labels, the chain."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import CONV_IMPL, tiny_config
from wmdd_jax import distill, relabel
from wmdd_jax.checkpoint import write_npz
from wmdd_jax.data import denormalize, load_split, normalize
from wmdd_jax.errors import UserError
from wmdd_jax.metric_writers import read_scalars
from wmdd_jax.models import BN_STATS, collect_bn_moments, create_model, pooled_moments
from wmdd_jax.teacher import load_teacher, pretrain
from wmdd_jax.train_step import Teacher, augmented_input, batch_indices, batch_plan, data_key, init_variables


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny teacher, its statistics and barycenters, shared by the tests of this file."""
    workdir = str(tmp_path_factory.mktemp("distill"))
    config = tiny_config()
    config.synthesis.iterations = 6
    config.synthesis.checkpoint_every_steps = 2
    pretrain(config, workdir)
    distill.statistics(config, workdir)
    distill.barycenter(config, workdir)
    return config, workdir


def test_class_statistics_are_exact(distilled):
    config, workdir = distilled
    teacher = load_teacher(config, workdir)
    source = load_split(config.data, "train")
    stats = distill.load_statistics(os.path.join(workdir, distill.STATS_DIR), source.num_classes)
    for k in (0, 7):
        images, _ = source.get(source.class_indices(k))
        x = normalize(images, source.mean, source.std)
        (_, feats), state = teacher.model.apply(teacher.variables, x, train=False, return_features=True,
                                                mutable=[BN_STATS])
        np.testing.assert_allclose(stats.features[k], feats, rtol=1e-4, atol=1e-5)
        for layer, (m, v) in collect_bn_moments(state).items():
            mean, var = pooled_moments(m, v)
            np.testing.assert_allclose(stats.bn_mean[layer][k], mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stats.bn_var[layer][k], var, rtol=1e-4, atol=1e-5)


def _exact_w2(x, y, b):
    """Exact W2^2 between the uniform cloud ``x`` and ``sum_j b_j delta_{y_j}``, POT's network simplex."""
    import ot

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(ot.emd2(np.full(len(x), 1 / len(x)), np.asarray(b, np.float64) / np.sum(b), ot.dist(x, y)))


def test_barycenter_targets_are_each_classs_barycenter(distilled):
    """Against POT's exact OT on the stored class features: each class's reported cost is a feasible
    plan's, so at least the exact W2^2 to its support, and close to it (<= 0.5% above: the entropic
    rounding; 0.03% measured on these 40-point classes), and no other class's support is nearer (the
    rows belong to their class). With learned weights, the weights are the class's nearest-support-
    point mass fractions."""
    config, workdir = distilled
    stats = distill.load_statistics(os.path.join(workdir, distill.STATS_DIR), list(range(10)))
    out = distill.load_barycenters(os.path.join(workdir, distill.BARYCENTER_DIR), list(range(10)))
    for k, x in enumerate(stats.features):
        exact = _exact_w2(x, out["support"][k], out["weights"][k])
        assert exact * (1 - 1e-5) <= out["cost"][k] <= exact * (1 + 5e-3), (k, out["cost"][k], exact)
        others = min(_exact_w2(x, out["support"][j], out["weights"][j]) for j in range(10) if j != k)
        assert exact < others, (k, exact, others)
    learned_config = config.barycenter.copy_and_resolve_references()
    learned_config.learn_weights = True
    learned = jax.tree.map(np.asarray, distill.compute_barycenters(stats, config.ipc, learned_config, config.seed))
    for k, x in enumerate(stats.features):
        support = learned.support[k]
        nearest = ((x[:, None] - support[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_allclose(learned.weights[k], np.bincount(nearest, minlength=config.ipc) / len(x),
                                   atol=1e-6, err_msg=f"class {k}")
        np.testing.assert_allclose(learned.cost[k], _exact_w2(x, support, learned.weights[k]), rtol=1e-4)


def test_loss_is_the_sum_of_official_batches():
    """All classes at once = the official loss summed over batches of `batch_size` images (whole classes)."""
    model = create_model("convnet3", 4, norm="batch", width=4, conv_impl=CONV_IMPL)
    teacher = Teacher(model, init_variables(model, jax.random.key(0), (8, 8, 1)))
    cfg = tiny_config().synthesis
    cfg.batch_size, cfg.crop_scale, cfg.flip, cfg.jitter = 4, None, False, 0  # no random draws
    C, m = 4, 2
    rng = np.random.default_rng(1)  # NumPy draws: a jax.random draw of a new shape compiles (seconds on CPU)
    images = rng.normal(size=(C, m, 8, 8, 1)).astype(np.float32)
    support = rng.normal(size=(C, m, 4)).astype(np.float32)  # width 4, 1x1 map after 3 pools
    layers = ("norm0", "norm1", "norm2")
    stat = lambda: {l: rng.uniform(size=(C, 4)).astype(np.float32) for l in layers}  # noqa: E731, E741
    targets = distill.Targets(support, stat(), stat())
    loss = jax.jit(lambda x, t, ids=None: distill.synthesis_loss(x, jax.random.key(5), teacher, t, cfg, 8, ids))
    full, parts = loss(images, targets)
    halves = []
    for g in range(2):  # batch_size 4 = 2 classes of m = 2 images
        sl = slice(2 * g, 2 * g + 2)
        t = distill.Targets(support[sl], {k: v[sl] for k, v in targets.bn_mean.items()},
                            {k: v[sl] for k, v in targets.bn_var.items()})
        halves.append(loss(images[sl], t, jnp.arange(C)[sl])[0])
    np.testing.assert_allclose(full, sum(halves), rtol=2e-5)
    assert all(float(v) > 0 for v in parts.values())


class Stop(Exception):
    pass


def test_recover_resumes_exactly(distilled, tmp_path, monkeypatch):
    config, workdir = distilled
    for name in ("full", "cut"):
        dst = tmp_path / name
        shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns("synthetic", "eval"))
    full = distill.recover(config, str(tmp_path / "full"))

    make = distill.make_synthesis_step

    def failing(*args, **kwargs):
        step, calls = make(*args, **kwargs), []

        def wrapped(*a):
            calls.append(1)
            if len(calls) > 3:
                raise Stop()
            return step(*a)
        return wrapped

    monkeypatch.setattr(distill.synthesis, "make_synthesis_step", failing)
    with pytest.raises(Stop):
        distill.recover(config, str(tmp_path / "cut"))
    monkeypatch.setattr(distill.synthesis, "make_synthesis_step", make)
    resumed = distill.recover(config, str(tmp_path / "cut"))
    np.testing.assert_allclose(resumed, full, atol=1e-6)
    assert os.path.exists(tmp_path / "cut" / "synthetic" / "grid.png")


def test_zero_iterations_keep_the_nearest_real_images(distilled, tmp_path):
    """``synthesis.iterations=0``: the images are the real images nearest the support points."""
    config, workdir = distilled
    config = config.copy_and_resolve_references()
    config.synthesis.iterations = 0
    shutil.copytree(workdir, tmp_path / "w", ignore=shutil.ignore_patterns("synthetic", "eval"))
    images = distill.recover(config, str(tmp_path / "w"))
    source = load_split(config.data, "train")
    stats = distill.load_statistics(os.path.join(workdir, distill.STATS_DIR), source.num_classes)
    bc = distill.load_barycenters(os.path.join(workdir, distill.BARYCENTER_DIR), list(range(source.num_classes)))
    init = distill.init_images(config, source, stats, bc["support"])
    expected = np.clip(np.asarray(denormalize(init, source.mean, source.std)), 0, 1).reshape(images.shape)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    assert distill.method_name(config) == "barycenter_real"
    changed = config.copy_and_resolve_references()
    changed.synthesis.iterations = 6  # the same work directory: refused, not the old images reused
    with pytest.raises(UserError, match="a synthetic set of another recipe \\(iterations: 0 there, 6 now\\)"):
        distill.recover(changed, str(tmp_path / "w"))
    changed.synthesis.iterations, changed.synthesis.log_every_steps = 0, 1  # bookkeeping only: reused
    np.testing.assert_array_equal(distill.recover(changed, str(tmp_path / "w")), images)
    real = np.asarray(source.get(np.arange(len(source)))[0], np.float32).reshape(len(source), -1)
    flat = images.reshape(len(images), -1)
    gaps = np.abs(flat[:, None, :] - real[None]).max(-1).min(-1)  # each image is some training image
    assert gaps.max() < 1e-5
    config.synthesis.iterations = -1
    with pytest.raises(UserError, match="iterations must be >= 0"):
        distill.recover(config, str(tmp_path / "bad"))


def _other_teacher(workdir, folder, change):
    """A copy of ``workdir``'s teacher with ``change(variables)`` applied to its weights."""
    from wmdd_jax.checkpoint import save_tree

    teacher = load_teacher(tiny_config(), workdir)
    shutil.copytree(os.path.join(workdir, "teacher"), folder)
    save_tree(os.path.join(folder, "final"), change(jax.tree.map(np.array, teacher.variables)))
    return str(folder)


def test_another_teacher_is_refused_by_every_stage_downstream(distilled, tmp_path):
    """A finished work directory rerun with another teacher: statistics, barycenters, images and
    students made with the first one are refused, not reused."""
    from wmdd_jax.evaluate import evaluate

    config, workdir = distilled
    config = config.copy_and_resolve_references()  # the fixture's 6 steps: test_recover's compiled program
    swap = tmp_path / "swap"
    shutil.copytree(workdir, swap)
    distill.recover(config, str(swap))
    config.eval.label_modes = ("soft",)
    config.eval.soft.epochs = 1
    evaluate(config, str(swap))

    def nudge(variables):
        variables["params"]["conv0"]["kernel"][0, 0, 0, 0] += 1e-3
        return variables

    config.teacher.checkpoint = _other_teacher(workdir, tmp_path / "other", nudge)
    for stage, what in ((distill.statistics, "class statistics"), (distill.barycenter, "barycenters"),
                        (distill.recover, "a synthetic set")):
        with pytest.raises(UserError, match=f"holds {what} of another recipe \\(teacher: "):
            stage(config, str(swap))
    with pytest.raises(UserError, match="a training run of another recipe \\(teacher: "):
        evaluate(config, str(swap))
    # A teacher whose weights hold a NaN is refused when loaded.
    config.teacher.checkpoint = _other_teacher(workdir, tmp_path / "nan", lambda v: jax.tree.map(
        lambda x: np.full_like(x, np.nan), v))
    with pytest.raises(UserError, match="NaN or infinite values"):
        load_teacher(config, str(swap))


def test_non_finite_barycenters_and_images_are_not_written(distilled, tmp_path):
    config, workdir = distilled
    config = config.copy_and_resolve_references()
    w = tmp_path / "w"
    shutil.copytree(workdir, w, ignore=shutil.ignore_patterns("barycenter", "synthetic", "eval"))
    config.synthesis.lr = float("nan")  # an optimiser that diverges: every pixel NaN after one step
    config.synthesis.iterations = 1
    with pytest.raises(UserError, match=r"synthetic images of classes \[0, 1, .*9\] are not finite"):
        distill.recover(config, str(w))
    assert not os.path.exists(w / "synthetic" / "images.npz")
    path = w / "statistics" / "class_00003.npz"  # features of one class with a NaN
    with np.load(path) as z:
        arrays = dict(z)
    arrays["features"][0, 0] = np.nan
    write_npz(str(path), **arrays)
    shutil.rmtree(w / "barycenter")
    with pytest.raises(UserError, match=r"barycenters of classes \[3\] are not finite"):
        distill.barycenter(config, str(w))
    assert not os.path.exists(w / "barycenter" / "class_00003.npz")


def test_stored_soft_labels_are_the_online_teacher(distilled):
    config, workdir = distilled
    teacher = load_teacher(config, workdir)
    source = load_split(config.data, "train")
    images, _ = source.get(np.arange(0, 400, 20))
    spec = config.eval.soft.copy_and_resolve_references()
    spec.augment.cutmix = 1.0  # the ImageNet configs' relabel: crop + flip + CutMix
    logits = relabel.store_soft_labels(teacher, spec, images, source.mean, source.std, data_seed=4, verbose=False)
    batch_size, steps = batch_plan(len(images), spec)
    assert logits.shape == (steps, batch_size, 10) and logits.dtype == np.float16
    mean, std = np.float32(source.mean), np.float32(source.std)
    online = jax.jit(lambda batch, step: teacher.model.apply(  # one compile; op by op, CutMix's Beta draw is slow
        teacher.variables, augmented_input(spec, batch, mean, std, data_key(4), step), train=False))
    for step in (0, steps - 1):
        idx = batch_indices(len(images), batch_size, step, 4)
        np.testing.assert_allclose(logits[step], online(images[idx], step), rtol=2e-3, atol=2e-3)
    # Stored labels name their augmentation: a student recipe without CutMix refuses them.
    folder = os.path.join(workdir, "stored_cutmix")
    os.makedirs(folder)
    made_by = {"teacher": "t" * 16, "images": "i" * 16}
    write_npz(os.path.join(folder, relabel.SOFT_LABELS_FILE), logits=logits, data_seed=4, epochs=spec.epochs,
              batch_size=batch_size, num_images=len(images), augment=relabel.augment_recipe(spec), **made_by)
    assert relabel.load_soft_labels(folder, spec, len(images), made_by)[1] == 4
    with pytest.raises(UserError, match="augmentation"):
        relabel.load_soft_labels(folder, config.eval.soft, len(images), made_by)
    # ... and their batches: a student recipe with another batch size is refused, not a traceback.
    halved = spec.copy_and_resolve_references()
    halved.batch_size = batch_size // 2
    with pytest.raises(UserError, match=f"in batches of {batch_size}, the recipe is .* in batches of {batch_size // 2}"):
        relabel.load_soft_labels(folder, halved, len(images), made_by)
    # ... and the teacher and image set they came from.
    for key, what in (("teacher", "another teacher"), ("images", "another image set")):
        with pytest.raises(UserError, match=what):
            relabel.load_soft_labels(folder, spec, len(images), dict(made_by, **{key: "x" * 16}))


def test_all_stages_from_the_command_line(tmp_path):
    """The whole chain on the test subset: every output file, and students above chance."""
    from tests.test_cli import TINY, cli

    # The teacher and synthesis recipes of the `distilled` fixture (teacher batches of 32, 2 epochs; 6
    # synthesis steps): the command line finds their compiled programs in the session's compilation
    # cache (tests/conftest.py) instead of compiling them again.
    overrides = [*TINY, "--config.teacher.batch_size=32", "--config.synthesis.iterations=6",
                 "--config.eval.hard.epochs=40", "--config.eval.soft.epochs=10",
                 "--config.eval.label_modes=('hard','soft')", "--config.eval.soft.relabel=stored",
                 "--config.synthesis.log_every_steps=2"]
    out = cli("all", "--config=configs/fashion_mnist.py", *overrides, workdir=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    # The recover stage's loss parts and learning rate, as JSON lines and as TensorBoard curves.
    curves = read_scalars(str(tmp_path / "synthetic"))
    assert set(curves) == {"ce", "feature", "bn", "learning_rate"}
    assert [step for step, _ in curves["bn"]] == [2, 4, 6]
    logged = [json.loads(line) for line in open(tmp_path / "synthetic" / "metrics.jsonl")]
    assert [row["bn"] for row in logged] == pytest.approx([value for _, value in curves["bn"]])
    assert curves["learning_rate"][0][1] > curves["learning_rate"][-1][1] > 0  # cosine, 6 steps
    for path in ("teacher/result.json", "statistics/class_00009.npz", "barycenter/class_00009.npz", "synthetic/images.npz",
                 "synthetic/grid.png", "synthetic/soft_labels.npz", "eval/summary.jsonl"):
        assert os.path.exists(tmp_path / path), path
    with np.load(tmp_path / "synthetic" / "images.npz") as z:
        assert z["images"].shape == (20, 28, 28, 1) and str(z["method"]) == "wmdd"
        assert 0 <= z["images"].min() and z["images"].max() <= 1
    with open(tmp_path / "eval" / "summary.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["method"], r["label_mode"]) for r in rows] == [("wmdd", "hard"), ("wmdd", "soft")]
    assert rows[1]["soft_labels"] == "stored"
    assert rows[0]["mean"] > 15.0  # chance is 10%
    # Rerun: every stage finds its outputs and skips.
    again = cli("all", "--config=configs/fashion_mnist.py", *overrides, workdir=str(tmp_path))
    assert again.returncode == 0 and "recover:" not in again.stdout

    # The random-real baseline from the same teacher, through the evaluate stage.
    baseline = [*overrides, "--config.eval.source=random_real", "--config.eval.label_modes=('soft',)",
                "--config.eval.soft.relabel=online"]
    out = cli("evaluate", "--config=configs/fashion_mnist.py", *baseline, workdir=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "eval" / "summary.jsonl") as f:
        row = [json.loads(line) for line in f][-1]
    assert (row["method"], row["label_mode"], row["ipc"], row["n_seeds"]) == ("random_real", "soft", 2, 1)
    assert set(row) >= {"dataset", "model", "metric", "mean", "std", "command", "date"}
    assert "python -m wmdd_jax evaluate" in row["command"]
    with open(tmp_path / "teacher" / "result.json") as f:
        assert json.load(f)["test_accuracy"] > 10.0

    # A corrupt teacher checkpoint is a UserError (which the command line prints as one line, no
    # traceback: tests/test_cli.py), checked here without starting another process.
    for root, _, files in os.walk(tmp_path / "teacher" / "final"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0")
    with pytest.raises(UserError, match="cannot be restored"):
        load_teacher(tiny_config(), str(tmp_path))


def test_padded_classes_change_nothing():
    """Empty classes with a zero mask (the padding of a class axis split over devices) add nothing."""
    model = create_model("convnet3", 4, norm="batch", width=4, conv_impl=CONV_IMPL)
    teacher = Teacher(model, init_variables(model, jax.random.key(0), (8, 8, 1)))
    cfg = tiny_config().synthesis
    cfg.batch_size = 6  # groups of 3 classes: the padding shares a group with a real class
    C, m, pad = 4, 2, 2
    rng = np.random.default_rng(1)  # NumPy draws: a jax.random draw of a new shape compiles (seconds on CPU)
    images = rng.normal(size=(C, m, 8, 8, 1)).astype(np.float32)
    layers = ("norm0", "norm1", "norm2")
    targets = distill.Targets(rng.normal(size=(C, m, 4)).astype(np.float32),
                              {l: rng.uniform(size=(C, 4)).astype(np.float32) for l in layers},  # noqa: E741
                              {l: rng.uniform(size=(C, 4)).astype(np.float32) for l in layers})  # noqa: E741
    padded = jax.tree.map(lambda x: jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]),
                          (images, targets))
    ids = jnp.concatenate([jnp.arange(C), jnp.zeros(pad, jnp.int32)])
    mask = jnp.concatenate([jnp.ones(C), jnp.zeros(pad)])
    for per_class_bn in (True, False):
        cfg.per_class_bn = per_class_bn
        t = targets if per_class_bn else targets._replace(bn_mean={l: v[0] for l, v in targets.bn_mean.items()},
                                                          bn_var={l: v[0] for l, v in targets.bn_var.items()})
        tp = padded[1] if per_class_bn else padded[1]._replace(bn_mean=t.bn_mean, bn_var=t.bn_var)
        grad_fn = jax.jit(jax.value_and_grad(
            lambda x, tg, *ids_mask: distill.synthesis_loss(x, jax.random.key(5), teacher, tg, cfg, 8, *ids_mask),
            has_aux=True))
        (loss, parts), grad = grad_fn(images, t)
        (loss_p, parts_p), grad_p = grad_fn(padded[0], tp, ids, mask)
        np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
        for k in parts:
            np.testing.assert_allclose(parts_p[k], parts[k], rtol=1e-5)
        np.testing.assert_allclose(grad_p[:C], grad, rtol=1e-4, atol=1e-7)
        assert np.all(grad_p[C:] == 0), "padded images must get a zero (finite) gradient"


def test_committed_teacher_loads_and_classifies():
    """experiments/teachers/ holds the experiments' teacher (92.67% on the full test split)."""
    from tests.conftest import ROOT
    from wmdd_jax.predict import evaluate_accuracy

    config = tiny_config()
    config.teacher.checkpoint = os.path.join(ROOT, "experiments", "teachers", "fashion_mnist_convnet3_bn")
    teacher = load_teacher(config, "/nonexistent")
    assert teacher.model.width == 128 and set(teacher.variables) == {"params", "batch_stats"}
    accuracy = evaluate_accuracy(teacher.model, teacher.variables, load_split(config.data, "test"))
    assert accuracy > 85.0  # the committed subset's 200 test images


def test_a_teacher_of_another_dataset_is_refused(distilled, tmp_path):
    config, workdir = distilled
    folder = tmp_path / "teacher100"
    shutil.copytree(os.path.join(workdir, "teacher"), folder)
    described = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(dict(described, num_classes=100)))
    config = config.copy_and_resolve_references()
    config.teacher.checkpoint = str(folder)
    with pytest.raises(UserError, match=r"trained on 100 classes of \(28, 28, 1\) images, but fashion_mnist has 10"):
        load_teacher(config, workdir)
