"""Training on a mesh: data-parallel teachers, stacked students spread over devices, several processes.

The device count is fixed when jax starts, so each case runs in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=N; the multi-process case starts 2 processes x 2
devices through jax.distributed on 127.0.0.1 (the command line, as a user would).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from tests.conftest import FMNIST_SUBSET, ROOT
from tests.test_sharding import _free_port

# Largest |weight difference| after the runs below, measured here: data parallel over 8 devices
# vs 1: 4.8e-7; stacked runs spread over devices vs alone: 2.4e-7 (per-device batch shapes change
# only the summation order). Two epochs of SGD barely amplify round-off, so 1e-4 is a bound with
# room for other machines' kernels, far below a change of the training (an lr 10% off moves them
# by 1e-2).
ATOL = 1e-4


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


ON_EIGHT_DEVICES = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax, ml_collections, numpy as np
    from tests.conftest import FMNIST_SUBSET, tiny_spec
    from wmdd_jax.data import load_split
    from wmdd_jax.models import create_model
    from wmdd_jax.sharding import make_mesh
    from wmdd_jax.train import Run, train, train_group
    from wmdd_jax.placement import BatchLayout

    assert jax.device_count() == 8
    root = sys.argv[1]
    data = ml_collections.ConfigDict(dict(name="fashion_mnist", data_dir=FMNIST_SUBSET))
    source, test = load_split(data, "train"), load_split(data, "test")
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(-1,), axes=("classes",))))
    spec = tiny_spec(epochs=2, batch_size=64, augment=dict(flip=True, shift=2))
    # conv_impl "auto": on CPU the Winograd convolutions and the first convolution folded into the
    # BatchNorm after it, whose statistics are then sums over the global batch too.
    model = create_model("convnet3", 10, width=8, norm="batch", conv_impl="auto")
    out = {}
    # a teacher-like run, data parallel: batch 64 over 8 devices, BN statistics over the global batch
    assert BatchLayout(mesh, None, 64).mode == "batch"
    for name, m in (("one", None), ("dp", mesh)):
        out[name] = train(model, spec, source, f"{root}/{name}", seed=0, test_source=test, verbose=False, mesh=m)
    # Every device: 8 runs one each; 3 students of batch 100 (neither divides 8) on a 2 x 4 grid, the
    # runs padded to 4 (a copy of the last) and each batch split over 4; likewise 3 of batch 60.
    assert (BatchLayout(mesh, 8, 100).mode, BatchLayout(mesh, 8, 100).mesh.size) == ("runs", 8)
    grid = BatchLayout(mesh, 3, 100)
    assert (grid.mode, dict(grid.mesh.shape), grid.padded_runs) == ("grid", {"runs": 2, "batch": 4}, 4)
    assert BatchLayout(mesh, 3, 100, num_processes=2).mode == "grid"  # several hosts: all devices too
    spec.batch_size = 60
    for name, m in (("alone", None), ("spread", mesh)):
        runs = [Run(source, f"{root}/{name}{s}", seed=s) for s in range(3)]
        out[name] = train_group(model, spec, runs, test_source=test, verbose=False, mesh=m)
    # On the host: one device's results and the mesh's live on different devices.
    gap = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                           for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)))
    print("GAPS", gap(out["one"], out["dp"]), max(gap(a, b) for a, b in zip(out["alone"], out["spread"])))
""")


def test_data_parallel_and_spread_runs_match_one_device(tmp_path):
    run = subprocess.run([sys.executable, "-c", ON_EIGHT_DEVICES, str(tmp_path)], cwd=ROOT, env=_env(8),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    gaps = [float(v) for v in run.stdout.split("GAPS")[1].split()[:2]]
    assert max(gaps) < ATOL, run.stdout

CLI = ["--config=configs/fashion_mnist.py", f"--config.data.data_dir={FMNIST_SUBSET}", "--config.conv_impl=lax",
       "--config.teacher.width=8", "--config.teacher.epochs=2", "--config.teacher.batch_size=32",
       "--config.eval.source=random_real", "--config.ipc=4", "--config.eval.hard.width=8",
       "--config.eval.hard.epochs=3", "--config.eval.seeds=(0,1)", "--config.eval.label_modes=('hard',)"]


def _cli(stage, workdir, devices, extra=(), processes=1):
    port = _free_port()
    procs = []
    for pid in range(processes):
        distributed = [] if processes == 1 else [
            "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={pid}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "wmdd_jax", stage, f"--workdir={workdir}", *CLI,
                                       *distributed, *extra], cwd=ROOT, env=_env(devices),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    return logs


def test_two_processes_train_the_teacher_and_the_students_data_parallel(tmp_path):
    """pretrain and evaluate on 2 processes x 2 devices (each loads its half of every batch) end
    where one process with 4 devices ends; the summary is written once."""
    from configs.fashion_mnist import get_config
    from wmdd_jax.teacher import load_teacher

    for name, processes, devices in (("one", 1, 4), ("two", 2, 2)):
        for stage in ("pretrain", "evaluate"):
            logs = _cli(stage, tmp_path / name, devices, processes=processes)
        if processes == 2:  # process 0 speaks for both
            assert "convnet3 hard:" in logs[0] and "convnet3 hard:" not in logs[1]
    config = get_config()
    config.data.data_dir, config.conv_impl = FMNIST_SUBSET, "lax"
    teachers = [load_teacher(config, str(tmp_path / name)) for name in ("one", "two")]
    for x, y in zip(jax.tree.leaves(teachers[0].variables), jax.tree.leaves(teachers[1].variables)):
        np.testing.assert_allclose(x, y, atol=ATOL)
    rows = [[json.loads(line) for line in open(tmp_path / name / "eval" / "summary.jsonl")] for name in ("one", "two")]
    assert len(rows[1]) == 1 and rows[1][0]["n_seeds"] == 2
    # The students differ by round-off too: at most one of the 200 test images may flip.
    np.testing.assert_allclose(rows[1][0]["values"], rows[0][0]["values"], atol=0.5 + 1e-9)
