"""Every dataset config loads and passes the config check; the check refuses bad values and says what to take."""

import importlib
import pkgutil

import pytest

import configs
from wmdd_jax.config_check import check_config
from wmdd_jax.data import available
from wmdd_jax.errors import UserError
from wmdd_jax.models import create_model

NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "default")


def test_all_dataset_configs_exist():
    assert set(NAMES) >= {"fashion_mnist", "cifar10", "cifar100", "imagenette", "tiny_imagenet", "imagenet1k"}


@pytest.mark.parametrize("name", NAMES)
def test_config_is_consistent(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.data.name in available()
    for spec in (config.teacher, config.eval.hard, config.eval.soft):
        create_model(spec.model, 10, norm=spec.norm, stem=spec.stem)
        assert spec.optimizer in ("sgd", "adamw", "adam") and spec.schedule in ("cosine", "step", "constant")
    assert config.teacher.norm == "batch" or config.teacher.model.startswith("resnet")
    assert config.eval.soft.label_mode == "soft" and config.eval.hard.label_mode == "hard"
    check_config(config)


# One bad value per kind of check, set on the Fashion-MNIST config, and the message that names the
# --config key, what it holds and what it takes.
BAD_VALUES = [
    ("ipc", 0, "--config.ipc=0 is not valid: it takes a whole number >= 1"),
    ("ipc", True, "--config.ipc=True is not valid"),  # a bool is no count
    ("conv_impl", "fft", "--config.conv_impl='fft' is not valid: use one of auto, winograd, im2col, lax"),
    ("teacher.optimizer", "sdg", "--config.teacher.optimizer='sdg' is not valid: use one of sgd, adamw, adam"),
    ("eval.soft.schedule", "cosin", "--config.eval.soft.schedule='cosin' is not valid: use one of cosine"),
    ("teacher.model", "resnet81", "--config.teacher.model='resnet81' is not valid: use one of "),
    ("eval.soft.weight_init", "he", "--config.eval.soft.weight_init='he' is not valid: use one of torch, kaiming"),
    ("eval.hard.lr", float("nan"), "--config.eval.hard.lr=nan is not valid: it takes a finite number > 0"),
    ("eval.hard.weight_decay", -1e-4, "it takes a finite number >= 0"),
    ("teacher.augment.crop_scale", (0.5, 0.2), "it takes (lo, hi) with 0 < lo <= hi <= 1, or None"),
    ("eval.soft.augment.cutmix", 1.5, "it is a probability in [0, 1]"),
    ("eval.models", ("convnet3", "convnet5"), "'convnet5' is not a model; use "),
    ("eval.models", (), "name at least one model"),
    ("eval.label_modes", ("hard", "hard"), "name hard and/or soft, each once"),
    ("eval.seeds", (0, 0, 0), "--config.eval.seeds=(0, 0, 0) is not valid: give distinct whole numbers"),
    ("eval.hard.label_mode", "soft", "choose the label modes with --config.eval.label_modes"),
    ("synthesis.iterations", -1, "--config.synthesis.iterations=-1 is not valid: it takes a whole number >= 0"),
    ("synthesis.init", "zeros", "use one of real, noise"),
    ("barycenter.max_features_per_class", 1, "keep at least ipc=10 features per class (or 0: all)"),
    ("mesh.shape", (-1, -1), "at most one -1"),
    ("mesh.axes", ("a", "b"), "name one axis per entry of mesh.shape (-1,)"),
    ("export.image_format", "gif", "use one of png, jpeg"),
    ("compilation_cache.max_size_mb", -2, "it takes a whole number of MiB >= 0, or -1 (no bound)"),
    ("compilation_cache.min_compile_secs", -1.0, "it takes a finite number >= 0"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_check_config_refuses_a_bad_value_saying_what_to_do(key, value, message):
    from configs import fashion_mnist

    config = fashion_mnist.get_config()
    check_config(config)  # the value below is what makes it fail
    *path, name = key.split(".")
    node = config
    for part in path:
        node = node[part]
    with node.ignore_type():
        node[name] = value
    with pytest.raises(UserError) as e:
        check_config(config)
    assert message in str(e.value), str(e.value)


def test_quick_fashion_mnist_variant_only_shrinks_budgets():
    from configs import fashion_mnist

    full, quick = fashion_mnist.get_config(), fashion_mnist.get_config("quick")
    assert quick.teacher.epochs < full.teacher.epochs and quick.synthesis.iterations < full.synthesis.iterations
    assert quick.synthesis.lr == full.synthesis.lr and quick.eval.soft.epochs == full.eval.soft.epochs
    with pytest.raises(ValueError, match="unknown variant"):
        fashion_mnist.get_config("fast")
