"""The Fashion-MNIST synthesis search: lr, r_bn, r_wb, crop scale, the number of iterations and the
barycenter weights, chosen on a validation split held out of the training set, never on the test split
(no published setting exists for this dataset; docs/method.md).

One factor at a time around ``configs/fashion_mnist.py``: every candidate is the base recipe with
one value changed, distilled at ``--ipc`` (default 10) and scored by students with teacher soft labels
on ``--val-per-class`` training images per class that the statistics, barycenters and initial images
never see. All candidates share one statistics + barycenter pass (those stages do not depend on the
searched values), except ``barycenter.*`` candidates, which compute their own barycenters. The
candidate ``random_real`` is the reference a recipe has to beat: students on random real training
images, same IPC, same soft labels, same validation images. Resumable: rerun the same command; each
finished candidate is written at once to experiments/results/fashion_mnist_tuning.jsonl (metric
``validation_accuracy``).

    python experiments/tune_fashion_mnist.py --root ~/wmdd-runs/tune [--teacher DIR] \\
        [--only NAME ...] [--config.KEY=VALUE ...]  # candidates to run; overrides for every run

The committed teacher was trained on the whole training split, validation images included; a
student never sees them, but its soft labels and the synthesis targets come from a teacher that did.
Pass a teacher trained with the same ``--config.data.validation_per_class`` to remove that leak
(``experiments/teachers/fashion_mnist_convnet3_bn_val500`` is one, for 500). Rows carry the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.fashion_mnist_wmdd import code_commit  # noqa: E402
from wmdd_jax import results  # noqa: E402

# The committed teacher: `python -m wmdd_jax pretrain --config=configs/fashion_mnist.py`, 92.67% test.
TEACHER = os.path.join(ROOT, "experiments", "teachers", "fashion_mnist_convnet3_bn")
OUT = os.path.join(ROOT, "experiments", "results", "fashion_mnist_tuning.jsonl")
SEARCH = {  # config key -> values tried (the base value is configs/fashion_mnist.py's)
    "synthesis.lr": [0.1, 0.5],
    "synthesis.r_bn": [1.0, 100.0],
    "synthesis.r_wb": [0.1, 10.0],
    "synthesis.crop_scale": ["(0.08,1.0)", "(0.8,1.0)"],
    "synthesis.iterations": [0, 100, 250, 500, 1000],  # 0: the selected real images, unoptimised
    "barycenter.learn_weights": [True],  # the weighting that evaluates better is the default
}


def candidates() -> list[tuple[str, list[str]]]:
    """(name, overrides): the base, then one changed value each."""
    out = [("base", []), ("random_real", ["--config.eval.source=random_real"])]
    for key, values in SEARCH.items():
        out += [(f"{key.split('.')[-1]}={v}", [f"--config.{key}={v}"]) for v in values]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="one work directory per candidate goes under it")
    parser.add_argument("--teacher", default=TEACHER,
                        help="a finished teacher folder (from pretrain); default: the committed teacher")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--seeds", default="(0,)")
    parser.add_argument("--only", nargs="*", default=None, help="candidate names to run (default: all)")
    parser.add_argument("--out", default=OUT, help="results file (default: the committed one)")
    args, extra = parser.parse_known_args()
    if any(not a.startswith("--config.") for a in extra):
        parser.error(f"unknown arguments {[a for a in extra if not a.startswith('--config.')]}; "
                     "besides the options above, only --config.KEY=VALUE overrides (passed to every run)")

    common = [f"--config.teacher.checkpoint={args.teacher}", f"--config.ipc={args.ipc}",
              f"--config.data.validation_per_class={args.val_per_class}", "--config.eval.split=validation",
              "--config.eval.label_modes=('soft',)", f"--config.eval.seeds={args.seeds}", *extra]
    commit = code_commit()
    teacher = os.path.relpath(os.path.abspath(args.teacher), ROOT)
    shared = os.path.join(args.root, "shared")
    run = [sys.executable, "-m", "wmdd_jax"]
    for stage in ("statistics", "barycenter"):
        subprocess.run([*run, stage, "--config=configs/fashion_mnist.py", f"--workdir={shared}", *common],
                       cwd=ROOT, check=True)
    for name, overrides in candidates():
        if args.only is not None and name not in args.only:
            continue
        workdir = os.path.join(args.root, name.replace("(", "").replace(")", "").replace(",", "-"))
        reference = name == "random_real"
        if not reference:
            own_barycenter = any(o.startswith("--config.barycenter.") for o in overrides)
            for folder in ("statistics",) if own_barycenter else ("statistics", "barycenter"):
                if not os.path.exists(os.path.join(workdir, folder)):
                    shutil.copytree(os.path.join(shared, folder), os.path.join(workdir, folder))
        stage = "evaluate" if reference else "all"
        cmd = [*run, stage, "--config=configs/fashion_mnist.py", f"--workdir={workdir}", *common, *overrides]
        print("+", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        summary = [r for r in results.read_jsonl(os.path.join(workdir, "eval", "summary.jsonl"))
                   if r["label_mode"] == "soft" and r["ipc"] == args.ipc]
        if reference:
            timings = {"evaluate": round(time.time() - t0, 1)}
        else:
            with open(os.path.join(workdir, "timings.json")) as f:
                timings = json.load(f)
        shown = " ".join([f"python experiments/tune_fashion_mnist.py --root ROOT --teacher {teacher}",
                          f"--ipc {args.ipc} --val-per-class {args.val_per_class} --only '{name}'",
                          *([f"--seeds '{args.seeds}'"] if args.seeds != "(0,)" else []), *extra])
        row = dict(summary[-1], metric="validation_accuracy", candidate=name, overrides=overrides,
                   validation_per_class=args.val_per_class, command=shown, stage_seconds=timings,
                   machine="2-core CPU", teacher=teacher, code_commit=commit)
        results.upsert_jsonl(args.out, row, keys=(*results.KEY_FIELDS, "candidate", "teacher"))
        print(f"{name}: validation {row['mean']} ± {row['std']} ({row['n_seeds']} seeds)", flush=True)


if __name__ == "__main__":
    main()
