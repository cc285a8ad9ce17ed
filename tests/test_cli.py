"""The command line: one-line errors for bad input, and pretrain -> evaluate on the test subset."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import CONV_IMPL, FMNIST_SUBSET, ROOT

TINY = [
    f"--config.data.data_dir={FMNIST_SUBSET}", f"--config.conv_impl={CONV_IMPL}", "--config.teacher.width=8",
    "--config.teacher.epochs=2",
    "--config.teacher.batch_size=64", "--config.eval.hard.width=8", "--config.eval.soft.width=8",
    "--config.eval.hard.epochs=3", "--config.eval.soft.epochs=3", "--config.eval.seeds=(0,)", "--config.ipc=2",
]


def cli(*args, workdir="/nonexistent-wmdd"):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "wmdd_jax", *args, f"--workdir={workdir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,expected", [
    (["pretrain", "--config=configs/fashion_mnist.py", "--config.teacher.nokey=1"], "unknown config key 'nokey'"),
    (["distill_everything", "--config=configs/fashion_mnist.py"], "give exactly one stage"),
    (["pretrain", "--config=configs/missing.py"], "config file 'configs/missing.py' not found"),
    (["pretrain", "--config=configs/fashion_mnist.py", "--config.data.data_dir=/nonexistent"],
     "Fashion-MNIST idx files not found"),
    (["evaluate", "--config=configs/fashion_mnist.py", f"--config.data.data_dir={FMNIST_SUBSET}",
      "--config.eval.source=random_real", "--config.ipc=500"], "fewer than ipc=500"),
    (["evaluate", "--config=configs/fashion_mnist.py", f"--config.data.data_dir={FMNIST_SUBSET}",
      "--config.eval.source=random_real", "--config.eval.label_modes=('soft',)"], "no finished teacher"),
])
def test_bad_input_is_one_line(args, expected, tmp_path):
    out = cli(*args, workdir=str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wmdd_jax: error:") and expected in lines[0], out.stderr
