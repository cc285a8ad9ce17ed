"""Every dataset config loads, and its training recipes name things the code knows."""

import importlib
import pkgutil

import pytest

import configs
from wmdd_jax.data import available
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
    with pytest.raises(AttributeError):
        config.lock()
        config.no_such_key = 1


def test_quick_fashion_mnist_variant_only_shrinks_budgets():
    from configs import fashion_mnist

    full, quick = fashion_mnist.get_config(), fashion_mnist.get_config("quick")
    assert quick.teacher.epochs < full.teacher.epochs and quick.synthesis.iterations < full.synthesis.iterations
    assert quick.synthesis.lr == full.synthesis.lr and quick.eval.soft.epochs == full.eval.soft.epochs
    with pytest.raises(ValueError, match="unknown variant"):
        fashion_mnist.get_config("fast")
