"""Shared fixtures: the committed Fashion-MNIST subset and tiny configs."""

import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_SUBSET = os.path.join(ROOT, "tests", "data", "fashion_mnist")


@pytest.fixture
def fmnist_dir() -> str:
    """40 train and 20 test images per class of Fashion-MNIST, idx format."""
    return FMNIST_SUBSET


def tiny_spec(**overrides):
    """A training recipe small enough for a test (a few steps)."""
    from configs.default import train_spec

    spec = train_spec(epochs=2, batch_size=32, checkpoint_every_steps=2, checkpoint_every_secs=1e9,
                      log_every_steps=1, width=8)
    with spec.unlocked():
        spec.update(overrides)
    return spec


def tiny_config(workdir_data: str = FMNIST_SUBSET):
    """configs/fashion_mnist.py shrunk to seconds: narrow ConvNets, few epochs, one seed."""
    from configs import fashion_mnist

    config = fashion_mnist.get_config()
    config.data.data_dir = workdir_data
    for spec in (config.teacher, config.eval.hard, config.eval.soft):
        spec.width = 8
        spec.epochs = 2
        spec.batch_size = 32
        spec.log_every_steps = 1
    config.eval.seeds = (0,)
    config.ipc = 2
    return config
