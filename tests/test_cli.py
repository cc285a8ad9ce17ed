"""The command line: one-line errors for bad input, and pretrain -> evaluate on the test subset."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FMNIST_SUBSET, ROOT

TINY = [
    f"--config.data.data_dir={FMNIST_SUBSET}", "--config.teacher.width=8", "--config.teacher.epochs=2",
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


def test_pretrain_then_evaluate_random_real(tmp_path):
    workdir = str(tmp_path)
    out = cli("pretrain", "--config=configs/fashion_mnist.py", *TINY, workdir=workdir)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "teacher" / "result.json") as f:
        assert json.load(f)["test_accuracy"] > 10.0
    out = cli("evaluate", "--config=configs/fashion_mnist.py", *TINY, "--config.eval.source=random_real",
              "--config.eval.label_modes=('hard','soft')", workdir=workdir)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "eval" / "summary.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["method"], r["label_mode"], r["ipc"], r["n_seeds"]) for r in rows] == [
        ("random_real", "hard", 2, 1), ("random_real", "soft", 2, 1)]
    for r in rows:
        assert set(r) >= {"dataset", "model", "metric", "mean", "std", "command", "date"}
        assert "python -m wmdd_jax evaluate" in r["command"]
    # A corrupt teacher checkpoint ends in one line, no traceback.
    final = tmp_path / "teacher" / "final"
    for root, _, files in os.walk(final):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0")
    out = cli("evaluate", "--config=configs/fashion_mnist.py", *TINY, "--config.eval.source=random_real",
              "--config.eval.label_modes=('soft',)", workdir=workdir)
    assert out.returncode == 2 and "cannot be restored" in out.stderr and "Traceback" not in out.stderr
