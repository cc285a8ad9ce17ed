"""The training loop: learning, soft labels, exact resume after an interruption, bad checkpoints."""

import json
import os
import shutil
import threading

import jax
import numpy as np
import pytest

from tests.conftest import CONV_IMPL, tiny_spec
from wmdd_jax.data import load_split
from wmdd_jax.errors import UserError
from wmdd_jax.metric_writers import read_scalars
from wmdd_jax.models import create_model
from wmdd_jax.optim import soft_label_loss
from wmdd_jax import predict as predict_module
from wmdd_jax import train as train_module
from wmdd_jax import train_step as train_step_module
from wmdd_jax.train import Run, train, train_group
from wmdd_jax.train_step import Teacher, make_train_step


class Interrupted(Exception):
    pass


class FailingSource:
    """Wraps a source and raises after ``limit`` batches: a run killed mid-way."""

    def __init__(self, base, limit):
        self.base, self.limit, self.calls = base, limit, 0

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __len__(self):
        return len(self.base)

    def get(self, indices):
        self.calls += 1
        if self.calls > self.limit:
            raise Interrupted()
        return self.base.get(indices)


@pytest.fixture
def splits(fmnist_dir):
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(name="fashion_mnist", data_dir=fmnist_dir))
    return load_split(cfg, "train"), load_split(cfg, "test")


def test_resume_after_interruption_is_exact(tmp_path, splits):
    train_source, test_source = splits
    spec = tiny_spec(epochs=2, batch_size=64, checkpoint_every_steps=3, augment=dict(flip=True, shift=2))
    # lax.conv compiles ~3x faster; training with the CPU default (Winograd) runs in tests/test_sharding.py.
    model = create_model("convnet3", 10, norm="batch", width=8, conv_impl=CONV_IMPL)
    full = train(model, spec, train_source, str(tmp_path / "full"), seed=3, test_source=test_source,
                 verbose=False)
    with pytest.raises(Interrupted):
        train(model, spec, FailingSource(train_source, 8), str(tmp_path / "cut"), seed=3, verbose=False)
    assert not os.path.exists(tmp_path / "cut" / "result.json")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # killed mid-line: repaired on resume
        f.write('{"step": 9, "lo')
    with pytest.warns(UserWarning, match="cut-off last line"):
        resumed = train(model, spec, train_source, str(tmp_path / "cut"), seed=3, test_source=test_source,
                        verbose=False)
    for a, b in zip(jax.tree.leaves(full.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert resumed.test_accuracy == full.test_accuracy
    # Metrics logged after the checkpoint were dropped on resume: one line per step.
    with open(tmp_path / "cut" / "metrics.jsonl") as f:
        steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f]
    assert steps == list(range(1, full.steps + 1))
    # A finished run is loaded, not retrained.
    again = train(model, spec, train_source, str(tmp_path / "full"), seed=3, verbose=False)
    assert again.test_accuracy == full.test_accuracy
    # A result cut off mid-write is redone from the last checkpoint, not fatal.
    result = tmp_path / "full" / "result.json"
    result.write_text(result.read_text()[:10])
    with pytest.warns(UserWarning, match="unreadable"):
        redone = train(model, spec, train_source, str(tmp_path / "full"), seed=3, test_source=test_source,
                       verbose=False)
    assert redone.test_accuracy == full.test_accuracy and json.loads(result.read_text())["resumed_from"] == full.steps
    # ... if it is of the same recipe: another augmentation or seed is refused, a logging change is not.
    other = spec.copy_and_resolve_references()
    other.augment.shift = 0
    with pytest.raises(UserError, match="another recipe \\(augment:"):
        train(model, other, train_source, str(tmp_path / "full"), seed=3, verbose=False)
    with pytest.raises(UserError, match="data_seed: 3 there, 4 now; seed: 3 there, 4 now"):
        train(model, spec, train_source, str(tmp_path / "full"), seed=4, verbose=False)
    logged = spec.copy_and_resolve_references()
    logged.log_every_steps = 7
    assert train(model, logged, train_source, str(tmp_path / "full"), seed=3, verbose=False).test_accuracy == \
        full.test_accuracy


def test_training_learns_with_hard_and_soft_labels(tmp_path, splits, monkeypatch):
    """Both label modes learn, and each run's step compiles once (not again once its state, fresh from
    an initialisation, comes back from the first step committed to the device a loaded teacher is on)."""
    steps = []

    def recorded(*args, **kwargs):
        steps.append(make_train_step(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(train_module, "make_train_step", recorded)
    train_source, test_source = splits
    model = create_model("convnet3", 10, norm="instance", width=8, conv_impl=CONV_IMPL)
    hard = train(model, tiny_spec(epochs=8, lr=0.05), train_source, str(tmp_path / "hard"), seed=0,
                 test_source=test_source, verbose=False)
    assert hard.test_accuracy > 30.0  # chance is 10%
    teacher = Teacher(model, jax.device_put(hard.variables, jax.local_devices()[0]))  # as a loaded teacher
    soft = train(model, tiny_spec(epochs=4, optimizer="adamw", lr=3e-3, label_mode="soft", temperature=4.0),
                 train_source, str(tmp_path / "soft"), seed=0, test_source=test_source, teacher=teacher,
                 verbose=False)
    assert soft.test_accuracy > 20.0
    assert [step._cache_size() for step in steps] == [1, 1]


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_quickly_compiled_init_draws_the_default_programs_bits(norm):
    """`init_variables` compiles at LLVM level 1 on a CPU (half the compile time); the parameters
    are those of the default compilation, bit for bit, and it still composes with jit and eval_shape
    (which get the plain program: compiler options are for top-level programs only)."""
    model = create_model("convnet3", 10, norm=norm, width=128)  # the evaluation student / the teacher
    key, shape = jax.random.key(7), (28, 28, 1)
    quick = train_step_module.init_variables(model, key, shape)
    default = train_step_module._init_fn(model, shape, False)(key)
    for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    inside = jax.jit(lambda k: train_step_module.init_variables(model, k, shape))(key)
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shapes = jax.eval_shape(lambda: train_step_module.init_variables(model, jax.random.key(0), shape))
    assert [x.shape for x in jax.tree.leaves(shapes)] == [x.shape for x in jax.tree.leaves(quick)]


def test_recipe_is_enforced_only_once_there_are_outputs(tmp_path):
    from wmdd_jax.checkpoint import check_recipe

    folder = tmp_path / "run"
    check_recipe(str(folder), {"lr": 0.1, "crop": (0.5, 1.0)}, "a run")
    check_recipe(str(folder), {"lr": 0.1, "crop": [0.5, 1.0]}, "a run")  # tuples and lists read back alike
    check_recipe(str(folder), {"lr": 0.2, "crop": (0.5, 1.0)}, "a run")  # nothing written yet: replaced
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "state").write_text("x")
    with pytest.raises(UserError, match=r"holds a run of another recipe \(lr: 0.2 there, 0.1 now\)"):
        check_recipe(str(folder), {"lr": 0.1, "crop": (0.5, 1.0)}, "a run")
    check_recipe(str(folder), {"lr": 0.2, "crop": (0.5, 1.0)}, "a run")


def test_runs_from_before_weight_init_match_kaiming_only(tmp_path):
    """A run folder written before weight_init existed (its recipe has no such field; it drew kaiming)
    resumes under weight_init=kaiming and is refused under the new default, torch, naming the field."""
    from configs.default import train_spec
    from wmdd_jax.checkpoint import check_recipe
    from wmdd_jax.train import spec_recipe

    old = {k: v for k, v in spec_recipe(train_spec(weight_init="torch")).items() if k != "weight_init"}
    folder = tmp_path / "run"
    check_recipe(str(folder), old, "a training run")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "state").write_text("x")
    check_recipe(str(folder), spec_recipe(train_spec(weight_init="kaiming")), "a training run")
    with pytest.raises(UserError, match=r"another recipe \(weight_init: None there, 'torch' now\)"):
        check_recipe(str(folder), spec_recipe(train_spec()), "a training run")


def test_a_diverging_run_stops_with_the_step_and_the_key(tmp_path, splits):
    """A learning rate that sends the loss to NaN: one UserError naming the step and the config key,
    no result and no checkpoint of the diverged state."""
    spec = tiny_spec(lr=1e6, checkpoint_every_steps=1000, log_every_steps=1000)  # checked before the last save
    model = create_model("convnet3", 10, norm="batch", width=8, conv_impl=CONV_IMPL)
    with pytest.raises(UserError, match=r"teacher: the training loss became non-finite at step (\d+) of 26; .*"
                                        r"lower --config\.teacher\.lr \(now 1000000\.0\)") as e:
        train(model, spec, splits[0], str(tmp_path), seed=0, desc="teacher", config_key="teacher", verbose=False)
    assert int(e.value.args[0].split("at step ")[1].split()[0]) < 26  # the first bad step, not the last
    assert not os.path.exists(tmp_path / "result.json")
    assert not os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_all_finite_finds_any_bad_value_without_compiling(bad):
    """The finiteness check before a save: any NaN or infinity in any float leaf, integer leaves
    ignored, the same answer as the jitted check, and on a CPU no program compiled for it."""
    conv = np.zeros((3, 3, 2, 4), np.float32)
    if bad is not None:
        conv[2, 1, 0, 3] = bad
    tree = {"conv": {"kernel": jax.numpy.asarray(conv), "bias": jax.numpy.ones(4)},
            "step": jax.numpy.asarray(7, jax.numpy.int32), "scale": jax.numpy.ones((), jax.numpy.bfloat16)}
    compiled_before = train_module._all_finite._cache_size()
    assert train_module.all_finite(tree) is (bad is None)
    if jax.default_backend() == "cpu":
        assert train_module._all_finite._cache_size() == compiled_before
    assert bool(train_module._all_finite(tree)) is (bad is None)


def test_a_teacher_at_chance_is_flagged(tmp_path, capsys):
    """A learning rate that blows the weights up without a NaN (2 steps at lr 1e6: loss 5e9) leaves a
    finite teacher at chance: the pretrain stage says so instead of handing it on silently (in this
    process: the command line only prints what the stage prints)."""
    from configs import fashion_mnist
    from tests.conftest import FMNIST_SUBSET
    from wmdd_jax.teacher import pretrain

    config = fashion_mnist.get_config()
    config.data.data_dir, config.conv_impl = FMNIST_SUBSET, CONV_IMPL
    config.teacher.width, config.teacher.epochs, config.teacher.lr = 8, 1, 1e6
    pretrain(config, str(tmp_path))
    assert "close to chance (10%), so the teacher learned nothing" in capsys.readouterr().err


def test_cutmix_with_hard_labels_is_a_user_error(tmp_path, splits):
    model = create_model("convnet3", 10, norm="instance", width=4, conv_impl=CONV_IMPL)
    spec = tiny_spec(epochs=1)
    spec.augment.cutmix = 1.0
    with pytest.raises(UserError, match="label_mode 'soft'"):
        train(model, spec, splits[0], str(tmp_path), seed=0, verbose=False)


def test_soft_label_loss_is_kl():
    t = np.array([[2.0, 0.0, -1.0]])
    np.testing.assert_allclose(soft_label_loss(t, t, 20.0), [0.0], atol=1e-7)
    s = np.array([[0.0, 1.0, 0.0]])
    p, q = np.exp(t / 2) / np.exp(t / 2).sum(), np.exp(s / 2) / np.exp(s / 2).sum()
    np.testing.assert_allclose(soft_label_loss(s, t, 2.0), [np.sum(p * np.log(p / q))], rtol=1e-5)


def test_corrupt_checkpoint_is_a_user_error(tmp_path, splits):
    train_source, _ = splits
    # The model and recipe of the hard-label run above: its compiled step, from the compilation cache.
    spec = tiny_spec(epochs=8, lr=0.05)
    model = create_model("convnet3", 10, norm="instance", width=8, conv_impl=CONV_IMPL)
    with pytest.raises(Interrupted):  # after the checkpoint of step 2
        train(model, spec, FailingSource(train_source, 3), str(tmp_path), seed=0, verbose=False)
    assert os.listdir(tmp_path / "checkpoints")
    ckpt_dir = tmp_path / "checkpoints"
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(UserError, match="delete that folder"):
        train(model, spec, train_source, str(tmp_path), seed=0, verbose=False)


def test_concurrent_runs_equal_runs_in_turn_compile_once_and_resume(tmp_path, splits, monkeypatch):
    """Seeds trained at once, each in a thread (``together='concurrent'``, what ``auto`` picks on one CPU
    device), end bit for bit where they end in turn and compile each program once; a run that fails
    stops the others and its own error comes out; Ctrl-C stops them all; all resume."""
    assert jax.default_backend() == "cpu" and jax.process_count() == 1
    train_source, test_source = splits
    spec = tiny_spec(epochs=1, batch_size=40, checkpoint_every_steps=2, augment=dict(flip=True, shift=2))
    model = create_model("convnet3", 10, width=8, norm="batch", conv_impl=CONV_IMPL)
    small = [train_source.subset(np.arange(s * 7, s * 7 + 200)) for s in range(3)]

    def runs(root, sources=small):
        return [Run(src, str(tmp_path / root / f"seed{s}"), seed=s, data_seed=10 + s) for s, src in enumerate(sources)]

    def programs_compiled(together, root):
        """What ``train_group`` returns, how many programs it lowered (each lowering is compiled or read
        from the persistent cache) and in how many threads its runs trained."""
        jax.clear_caches()
        predict_module._predict_fn.cache_clear()
        lowered, threads = [], set()

        def listen(event, _seconds, **_):
            if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
                lowered.append(event)

        real = train_module._train_together
        monkeypatch.setattr(train_module, "_train_together",
                            lambda *a, **kw: threads.add(threading.current_thread().name) or real(*a, **kw))
        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            out = train_group(model, spec, runs(root), test_source=test_source, verbose=False, together=together)
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)
        return out, len(lowered), len(threads)

    in_turn, compiled_in_turn, threads = programs_compiled("sequence", "turn")
    assert threads == 1
    at_once, compiled_at_once, threads = programs_compiled("auto", "once")
    assert threads == 3
    # The same programs: a second jitted step, or predictions compiled on the helper thread for other
    # shardings or dtypes than they run with, would add lowerings (14 against 13 when tried).
    assert compiled_at_once == compiled_in_turn
    # Each thread runs the very program a run in turn runs, on the same inputs; XLA:CPU's results did
    # not depend on what else ran meanwhile in any run of this test here (bit for bit, 7 runs or more).
    assert_same_results(in_turn, at_once)
    for r in runs("once"):
        assert json.load(open(os.path.join(r.workdir, "result.json")))["concurrent_with"] == 3
    # The second run fails at its 4th batch (after its checkpoint at step 2): the others stop at their
    # next step and its error, not theirs, comes out. Then all resume to the same ends.
    with pytest.raises(Interrupted):
        train_group(model, spec, runs("cut", [small[0], FailingSource(small[1], 3), small[2]]),
                    test_source=test_source, verbose=False, together="concurrent")
    assert json.load(open(os.path.join(runs("cut")[1].workdir, "recipe.json"))) and \
        os.listdir(os.path.join(runs("cut")[1].workdir, "checkpoints"))
    resumed = train_group(model, spec, runs("cut"), test_source=test_source, verbose=False)
    assert_same_results(in_turn, resumed)
    assert json.load(open(os.path.join(runs("cut")[1].workdir, "result.json")))["resumed_from"] == 2

    # Ctrl-C (a KeyboardInterrupt in the main thread, which waits on the runs) while every run is in
    # its 4th batch: all stop at their next step, keeping their checkpoints at step 2; the interrupt
    # comes out once every thread has ended; all resume to the same ends.
    made, real_shared = [], train_module._Shared
    monkeypatch.setattr(train_module, "_Shared", lambda *a: made.append(real_shared(*a)) or made[-1])
    paused = [PausingSource(src, 3, made) for src in small]

    def interrupt(futures):
        for source in paused:
            assert source.reached.wait(120), "a run never reached its 4th batch"
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "wait", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_group(model, spec, runs("ctrl_c", paused), test_source=test_source, verbose=False, together="concurrent")
    assert [source.released for source in paused] == [True] * 3  # stopped by Ctrl-C, not by a timeout
    assert not [t for t in threading.enumerate() if t.name.startswith("train_group")]
    for r in runs("ctrl_c"):
        assert not os.path.exists(os.path.join(r.workdir, "result.json"))
        assert sorted(os.listdir(os.path.join(r.workdir, "checkpoints"))) == ["2"]
    monkeypatch.undo()
    resumed = train_group(model, spec, runs("ctrl_c"), test_source=test_source, verbose=False, together="concurrent")
    assert_same_results(in_turn, resumed)
    assert {json.load(open(os.path.join(r.workdir, "result.json")))["resumed_from"] for r in runs("ctrl_c")} == {2}


def assert_same_results(expected, actual):
    """The same test accuracies and weights, bit for bit, run by run."""
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.test_accuracy == b.test_accuracy
        for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables), strict=True):
            np.testing.assert_array_equal(x, y)


class PausingSource(FailingSource):
    """Wraps a source and, at batch ``limit + 1``, says so (``reached``) and waits until the concurrent
    runs are told to stop (the `_Shared` of ``made``): a run in the middle of a step when Ctrl-C comes."""

    def __init__(self, base, limit, made):
        super().__init__(base, limit)
        self.made, self.reached, self.released = made, threading.Event(), None

    def get(self, indices):
        self.calls += 1
        if self.calls == self.limit + 1:
            self.reached.set()
            self.released = self.made[-1].stop.wait(30)
        return self.base.get(indices)


def test_runs_trained_together_equal_runs_trained_alone_and_resume(tmp_path, splits):
    """Three seeds in one vmapped program end where each ends alone, also when killed and resumed;
    runs resumed from different steps are trained in turn."""
    train_source, test_source = splits
    spec = tiny_spec(epochs=1, batch_size=40, checkpoint_every_steps=3, augment=dict(flip=True, shift=2))
    model = create_model("convnet3", 10, width=8, norm="batch", conv_impl=CONV_IMPL)
    small = [train_source.subset(np.arange(s * 7, s * 7 + 200)) for s in range(3)]  # other images per run

    def runs(root, sources=small):
        return [Run(src, str(tmp_path / root / f"seed{s}"), seed=s, data_seed=10 + s) for s, src in enumerate(sources)]

    alone = [train(model, spec, r.source, r.workdir, seed=r.seed, data_seed=r.data_seed, verbose=False)
             for r in runs("alone")]
    # 5 steps each; killed after 4 batches, with a checkpoint at step 3
    with pytest.raises(Interrupted):
        train_group(model, spec, runs("cut", [FailingSource(src, 4) for src in small]), verbose=False,
                    together="stack")
    first, second, third = runs("cut")
    train(model, spec, first.source, first.workdir, seed=0, data_seed=10, verbose=False)  # finished alone
    shutil.rmtree(third.workdir)  # starts over: trained after the second, which resumes at step 3
    together = train_group(model, spec, runs("cut"), test_source=test_source, verbose=False, together="stack")
    # max |difference| of the weights here: 0 (this width-8 lax.conv model's vmapped and single steps
    # matched bit for bit on XLA:CPU; a width-128 Winograd ConvNet differed by 3e-4 after 6 AdamW
    # steps, where batched and single kernels sum in other orders); 1e-5 leaves room for other builds.
    for a, b in zip(alone, together):
        for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
            np.testing.assert_allclose(x, y, atol=1e-5)
    assert together[0].test_accuracy is None and together[1].test_accuracy is not None
    for r in (second, third):
        metrics = [json.loads(line) for line in open(os.path.join(r.workdir, "metrics.jsonl"))]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
        assert json.load(open(os.path.join(r.workdir, "result.json")))["resumed_from"] == (3 if r is second else 0)
        # The same curves for TensorBoard, with the learning rate and speed (the cut run's and the resumed).
        curves = read_scalars(r.workdir)
        assert set(curves) == {"loss", "accuracy", "learning_rate", "steps_per_s"}
        assert sorted({step for step, _ in curves["loss"]}) == [1, 2, 3, 4, 5]
        assert [v for step, v in curves["loss"] if step == 5][-1] == pytest.approx(metrics[-1]["loss"])
