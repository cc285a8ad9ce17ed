"""Shared fixtures: the committed Fashion-MNIST subset and tiny configs."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")

# libtpu is installed (the test extra: TPU targets are compiled on this CPU); without TPU chips jax
# would try it at start and print warnings. The command-line runs the tests start inherit this.
from wmdd_jax.host import skip_absent_tpu  # noqa: E402

skip_absent_tpu()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST_SUBSET = os.path.join(ROOT, "tests", "data", "fashion_mnist")

# One compilation cache for this test session, shared with the command-line runs the tests start
# (they inherit the environment): the same programs compiled again in another process, a resumed
# run or a second closure load instead. Empty at the start of every session, so the suite's time is
# that of a cold machine; a cache the caller set up is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="wmdd-jax-test-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# Tests of the pipeline run plain lax.conv: it compiles about 3x faster than the CPU default
# (Winograd), and compiling is most of a tiny test's time. tests/test_layers.py and
# tests/test_models.py check that every implementation computes the same convolution.
CONV_IMPL = "lax"


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
    config.conv_impl = CONV_IMPL
    for spec in (config.teacher, config.eval.hard, config.eval.soft):
        spec.width = 8
        spec.epochs = 2
        spec.batch_size = 32
        spec.log_every_steps = 1
    config.eval.seeds = (0,)
    config.ipc = 2
    return config


def run_on_cpu_devices(code: str, devices: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter with ``devices`` simulated CPU devices (fixed when jax starts)."""
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
