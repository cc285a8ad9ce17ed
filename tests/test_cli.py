"""The command line: one-line errors for bad input, and pretrain -> evaluate on the test subset."""

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


def cli(*args, workdir="/nonexistent-wmdd", cwd=ROOT, env=None):
    env = {**(os.environ if env is None else env), "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "wmdd_jax", *args, f"--workdir={workdir}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


FM = "--config=configs/fashion_mnist.py"


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
    # A typo is named with its key before anything runs (not after an hour of teacher training); every
    # check of wmdd_jax/config_check.py is tested directly in tests/test_configs.py.
    (["all", FM, "--config.teacher.optimizer=sdg"], "--config.teacher.optimizer='sdg' is not valid: use one of sgd"),
    (["pretrain", FM, "--config.ipcs=3"], 'unknown config key \'ipcs\' in a --config.* override: it must name a '
     'field of the config file (see configs/default.py). Did you mean "ipc" instead of "ipcs"?'),
    (["pretrain", FM + ":qick"], "unknown variant 'qick' of configs/fashion_mnist.py; use '' or 'quick'"),
    (["pretrain", FM, f"--config.data.data_dir={FMNIST_SUBSET}", "--config.compilation_cache.dir=/dev/null/xla"],
     "cannot create --config.compilation_cache.dir=/dev/null/xla"),
    # A key given twice takes the last value (config_flags alone joins tuples: hard, soft, soft).
    (["evaluate", FM, "--config.eval.label_modes=('hard','soft')", "--config.eval.label_modes=('soft',)",
      "--config.eval.seeds=(1,1)"], "--config.eval.seeds=(1, 1) is not valid"),
])
def test_bad_input_is_one_line(args, expected, tmp_path):
    out = cli(*args, workdir=str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wmdd_jax: error:") and expected in lines[0], out.stderr


def test_work_directory_problems_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    for workdir, expected in ((tmp_path / "a_file", "is a file, not a folder"),
                              (tmp_path / "a_file" / "sub", "cannot create --workdir")):
        out = cli("pretrain", FM, workdir=str(workdir))
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [
            out.stderr.strip().splitlines()[0]] and expected in out.stderr, out.stderr


def test_config_files_load_from_any_working_directory(tmp_path):
    """Outside the repository the config's own ``from configs import default`` still resolves."""
    out = cli("pretrain", f"--config={ROOT}/configs/fashion_mnist.py", "--config.ipc=0", workdir=str(tmp_path),
              cwd=str(tmp_path))
    assert out.returncode == 2 and "--config.ipc=0 is not valid" in out.stderr, out.stderr


def test_compiled_programs_go_to_the_users_cache_unless_turned_off(tmp_path):
    """By default (no $JAX_COMPILATION_CACHE_DIR) a run stores its compiled programs under
    $XDG_CACHE_HOME/wmdd_jax/xla, where later runs of the same shapes find them; '' turns it off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    teacher = [*TINY, "--config.teacher.epochs=1"]
    for name, extra in (("on", []), ("off", ["--config.compilation_cache.dir="])):
        out = cli("pretrain", FM, *teacher, *extra, workdir=str(tmp_path / name),
                  env={**env, "XDG_CACHE_HOME": str(tmp_path / f"xdg_{name}")})
        assert out.returncode == 0, out.stderr[-3000:]
    stored = os.listdir(tmp_path / "xdg_on" / "wmdd_jax" / "xla")
    assert any(f.startswith("jit_step-") for f in stored), stored  # the teacher's training step
    assert not os.path.exists(tmp_path / "xdg_off")
