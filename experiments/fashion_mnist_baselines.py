"""The teacher and the random-real evaluation baselines on Fashion-MNIST.

Runs, through the command line, resumably (rerun the same command after an interruption):
  1. pretrain the ConvNet-3 (batch norm) teacher on the full train split, or, with ``--teacher``,
     reuse a finished one (e.g. the committed experiments/teachers/fashion_mnist_convnet3_bn);
  2. evaluate random real subsets, IPC 1, 10, 50, hard and soft labels, 3 seeds each.
Each finished cell is written at once to experiments/results/fashion_mnist.jsonl, the teacher's
test accuracy (its ``result.json``) included; ``--teacher DIR --teacher-only`` writes only that row.

    python experiments/fashion_mnist_baselines.py --workdir ~/wmdd-runs/fmnist [--teacher DIR] [--ipcs 1 10 50] \
        [--config.KEY=VALUE ...]  # a student recipe other than the config's: its rows carry it as `variant`
    python experiments/fashion_mnist_baselines.py --teacher experiments/teachers/X --teacher-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wmdd_jax.results import code_commit  # noqa: E402
from wmdd_jax import results  # noqa: E402

OUT = os.path.join(ROOT, "experiments", "results", "fashion_mnist.jsonl")
CONFIG = "configs/fashion_mnist.py"


def run(stage: str, workdir: str, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "wmdd_jax", stage, f"--config={CONFIG}", f"--workdir={workdir}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return " ".join(["python", "-m", "wmdd_jax", stage, f"--config={CONFIG}", "--workdir=WORKDIR",
                     *[f'"{o}"' if "(" in o else o for o in overrides]])


def record_teacher(teacher_dir: str, command: str, **fields) -> None:
    """Writes the row of a finished teacher folder: its test accuracy and, for a run done in one go,
    its training wall time (both from its ``result.json``)."""
    with open(os.path.join(teacher_dir, "result.json")) as f:
        teacher = json.load(f)
    # Wall time only for a run done in one go; a resumed run's result covers its last part.
    timing = ({"train_minutes": round(teacher["seconds"] / 60, 1)} if teacher.get("resumed_from") == 0 else
              {"train_minutes": None, "timing_note": "interrupted and resumed; no single-run wall time"})
    results.upsert_jsonl(OUT, results.summary_row(
        dataset="fashion_mnist", method="teacher", model="convnet3_bn", ipc=None, label_mode="hard",
        values=[teacher["test_accuracy"]], command=command, machine="2-core CPU", **timing, **fields),
        keys=(*results.KEY_FIELDS, "teacher"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the teacher (unless --teacher) and the students are trained")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--label-modes", nargs="+", default=["hard", "soft"])
    parser.add_argument("--seeds", default="(0,1,2)")
    parser.add_argument("--teacher", default=None, help="a finished teacher folder to reuse instead of pretraining")
    parser.add_argument("--teacher-only", action="store_true", help="with --teacher: write its row and stop")
    args, extra = parser.parse_known_args()
    if any(not a.startswith("--config.") for a in extra):
        parser.error(f"unknown arguments {[a for a in extra if not a.startswith('--config.')]}; "
                     "besides the options above, only --config.KEY=VALUE overrides (passed to every run)")
    if args.teacher_only and args.teacher is None:
        parser.error("--teacher-only records the row of the folder given with --teacher; pass one")
    if args.workdir is None and not args.teacher_only:
        parser.error("--workdir is required (unless --teacher DIR --teacher-only)")

    commit = code_commit()
    reuse = []
    if args.teacher is None:
        record_teacher(os.path.join(args.workdir, "teacher"), run("pretrain", args.workdir), code_commit=commit)
    else:
        teacher = os.path.relpath(os.path.abspath(args.teacher), ROOT)
        # The row says which folder it reads; this command alone rewrites it.
        record_teacher(args.teacher, f"python experiments/fashion_mnist_baselines.py --teacher {teacher} "
                       "--teacher-only", teacher=teacher, code_commit=commit)
        if args.teacher_only:
            return
        reuse = [f"--config.teacher.checkpoint={teacher}"]

    for mode in args.label_modes:  # all hard-label cells first: they need no teacher
        for ipc in args.ipcs:
            command = run("evaluate", args.workdir, *reuse, "--config.eval.source=random_real", f"--config.ipc={ipc}",
                          f"--config.eval.label_modes=('{mode}',)", f"--config.eval.seeds={args.seeds}", *extra)
            rows = [r for r in results.read_jsonl(os.path.join(args.workdir, "eval", "summary.jsonl"))
                    if r["method"] == "random_real" and r["ipc"] == ipc and r["label_mode"] == mode]
            row = dict(rows[-1], command=command)
            if mode == "soft" and args.teacher is not None:  # the teacher behind the soft labels
                row["teacher"] = os.path.relpath(os.path.abspath(args.teacher), ROOT)
            if extra:  # a recipe other than the config's: its own row, named by its overrides
                row["variant"] = " ".join(a[len("--config."):] for a in extra)
            row["code_commit"] = commit
            results.upsert_jsonl(OUT, row, keys=(*results.KEY_FIELDS, "variant", "teacher"))
            print(f"random_real ipc={ipc} {mode}: {row['mean']} ± {row['std']} ({row['n_seeds']} seeds)", flush=True)


if __name__ == "__main__":
    main()
