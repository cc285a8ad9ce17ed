"""The Fashion-MNIST teacher trained data-parallel on N simulated devices against one device.

For each device count of ``--devices`` and each seed of ``--seeds``, trains the ConvNet-3 (batch
norm) teacher of ``configs/fashion_mnist.py`` through the command line (``python -m wmdd_jax
pretrain``, ``--epochs`` epochs, the recipe's batch of 256), with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, so the batch axis is split over N devices
and BatchNorm takes its statistics over the global batch. The devices share this machine's cores:
the times say nothing of a real multi-device speed-up.

One JSON line per (devices, seed) goes to ``--out`` as soon as that teacher is done: its test
accuracy, training seconds and, for N > 1, the largest absolute difference of its weights and BN
statistics from the 1-device teacher of the same seed (``max_abs_diff_vs_one_device``; the two
runs sum the batch in other orders, so they differ by round-off that training carries on). The
spread of the 1-device seeds is the noise a device count is judged against.

Resumable: the teachers live in ``--workdir`` (outside the repository); rerunning the same command
resumes an interrupted teacher from its last checkpoint and reuses finished ones.

    python experiments/teacher_devices.py --workdir ~/wmdd-runs/teacher_devices --epochs 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wmdd_jax import results  # noqa: E402

OUT = os.path.join(ROOT, "experiments", "results", "teacher_devices.jsonl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where the teachers are trained (outside the repository)")
    p.add_argument("--devices", default="1,8", help="comma-separated simulated device counts; 1 comes first")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated teacher seeds")
    p.add_argument("--epochs", type=int, default=2, help="teacher epochs (the recipe's are 20)")
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    args.devices = sorted(int(x) for x in args.devices.split(",") if x)
    args.seeds = [int(x) for x in args.seeds.split(",") if x]
    return args


def teacher_dir(args, devices: int, seed: int) -> str:
    return os.path.join(os.path.expanduser(args.workdir), f"devices{devices}_seed{seed}")


def train(args, devices: int, seed: int) -> tuple[dict, str]:
    """Trains (or resumes, or finds finished) one teacher; returns its result.json and the command."""
    overrides = [f"--config.seed={seed}", f"--config.teacher.epochs={args.epochs}"]
    cmd = [sys.executable, "-m", "wmdd_jax", "pretrain", "--config=configs/fashion_mnist.py",
           f"--workdir={teacher_dir(args, devices, seed)}", *overrides]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    print(f"+ devices={devices}", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    with open(os.path.join(teacher_dir(args, devices, seed), "teacher", "result.json")) as f:
        done = json.load(f)
    shown = (f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} python -m wmdd_jax pretrain "
             f"--config=configs/fashion_mnist.py --workdir=WORKDIR " + " ".join(overrides))
    return done, shown


def max_abs_diff(args, devices: int, seed: int) -> float:
    """Largest |difference| of the teacher's weights and BN statistics from the 1-device one (same seed)."""
    import jax
    import numpy as np

    from configs import fashion_mnist
    from wmdd_jax.teacher import load_teacher

    trees = []
    for n in (1, devices):
        config = fashion_mnist.get_config()
        config.teacher.checkpoint = os.path.join(teacher_dir(args, n, seed), "teacher")
        trees.append(load_teacher(config, "").variables)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])))


def main(args) -> None:
    if args.devices[0] != 1:
        args.devices.insert(0, 1)  # the reference every other count is compared with
    for devices in args.devices:
        for seed in args.seeds:
            done, command = train(args, devices, seed)
            row = dict(benchmark="teacher_devices", dataset="fashion_mnist", model="convnet3_bn", devices=devices,
                       seed=seed, epochs=args.epochs, steps=done["steps"],
                       test_accuracy=round(float(done["test_accuracy"]), 2),
                       train_seconds=round(float(done["seconds"]), 1) if done.get("resumed_from") == 0 else None,
                       max_abs_diff_vs_one_device=None if devices == 1 else float(
                           f"{max_abs_diff(args, devices, seed):.3g}"),
                       machine=args.machine, command=command, code_commit=results.code_commit(),
                       date=datetime.date.today().isoformat())
            results.upsert_jsonl(args.out, row, keys=("benchmark", "devices", "seed", "epochs", "machine"))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(parse_args())
