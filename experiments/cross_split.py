"""Scores finished students on the validation split *and* the test split, to tell the two apart.

The search (experiments/tune_fashion_mnist.py) trains students with 500 training images per class
held out and scores them on those. This script reloads each of those students (their ``final``
checkpoints; nothing is trained) and scores it on both the held-out images and the 10000 test
images. If a method's lead over another holds on one split and not the other with *the same
students*, the difference lies in the evaluation images, not in the training runs.

    python experiments/cross_split.py --root ~/wmdd-runs/tune50nl --candidates base random_real \\
        [--teacher experiments/teachers/fashion_mnist_convnet3_bn_val500] [--val-per-class 500]

Each candidate's row (per-seed accuracies on both splits) goes to
experiments/results/fashion_mnist_cross_split.jsonl, with per-class accuracies; the paired
differences are printed, overall and per class.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from wmdd_jax.results import code_commit  # noqa: E402
from wmdd_jax import checkpoint as ckpt  # noqa: E402
from wmdd_jax import results  # noqa: E402
from wmdd_jax.data import load_split  # noqa: E402
from wmdd_jax.errors import UserError  # noqa: E402
from wmdd_jax.teacher import model_from_spec  # noqa: E402
from wmdd_jax.predict import predict_classes  # noqa: E402
from wmdd_jax.train_step import init_variables  # noqa: E402

OUT = os.path.join(ROOT, "experiments", "results", "fashion_mnist_cross_split.jsonl")


def student_dirs(candidate_dir: str, ipc: int) -> dict[int, str]:
    """seed -> the finished soft-label ConvNet-3 student of one search candidate."""
    dirs = glob.glob(os.path.join(candidate_dir, "eval", "*", f"ipc{ipc}", "convnet3_soft", "seed*"))
    found = {int(os.path.basename(d)[len("seed"):]): d for d in dirs
             if os.path.exists(os.path.join(d, "result.json"))}
    if not found:
        raise UserError(f"no finished soft-label ConvNet-3 students under {candidate_dir}/eval/*/ipc{ipc}; "
                        "run experiments/tune_fashion_mnist.py for that candidate first")
    return dict(sorted(found.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the --root of experiments/tune_fashion_mnist.py")
    parser.add_argument("--candidates", nargs="+", default=["base", "random_real"])
    parser.add_argument("--teacher", required=True, help="the teacher the candidates were made with (recorded)")
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=500)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()

    config = fashion_mnist.get_config()
    config.data.validation_per_class = args.val_per_class
    splits = {name: load_split(config.data, name) for name in ("validation", "test")}
    spec = config.eval.soft.copy_and_resolve_references()
    with spec.unlocked():
        spec.model = "convnet3"
    model = model_from_spec(spec, splits["test"].num_classes, config.conv_impl)
    template = init_variables(model, jax.random.key(0), splits["test"].image_shape)
    commit = code_commit()
    scores = {}
    for name in args.candidates:
        seeds = student_dirs(os.path.join(args.root, name), args.ipc)
        per_split, per_class = {s: [] for s in splits}, {s: [] for s in splits}
        for seed, d in seeds.items():
            variables = ckpt.load_tree(os.path.join(d, "final"), template)
            with open(os.path.join(d, "result.json")) as f:
                recorded = json.load(f)["test_accuracy"]  # the search's score: the validation split
            for split, source in splits.items():
                hit = predict_classes(model, variables, source) == source.labels
                per_split[split].append(round(100 * float(hit.mean()), 2))
                per_class[split].append([round(100 * float(hit[source.labels == k].mean()), 2)
                                         for k in range(source.num_classes)])
            if abs(per_split["validation"][-1] - recorded) > 0.015:
                raise RuntimeError(f"{d}: validation accuracy {per_split['validation'][-1]} differs from the "
                                   f"recorded {recorded}; is --val-per-class the one the search used?")
            print(f"{name} seed {seed}: validation {per_split['validation'][-1]:.2f}, test {per_split['test'][-1]:.2f}")
        scores[name] = (list(seeds), per_split, per_class)
        row = dict(dataset="fashion_mnist", method="random_real" if name == "random_real" else "wmdd",
                   candidate=name, model="convnet3", ipc=args.ipc, label_mode="soft", metric="cross_split",
                   seeds=list(seeds), validation=per_split["validation"], test=per_split["test"],
                   validation_per_class=per_class["validation"], test_per_class=per_class["test"],
                   teacher=os.path.relpath(os.path.abspath(args.teacher), ROOT),
                   command=f"python experiments/cross_split.py --root ROOT --candidates {name} "
                           f"--teacher {os.path.relpath(os.path.abspath(args.teacher), ROOT)} --ipc {args.ipc} "
                           f"--val-per-class {args.val_per_class}",
                   code_commit=commit, date=datetime.date.today().isoformat())
        results.upsert_jsonl(args.out, row, keys=("dataset", "candidate", "ipc", "teacher"))
    names = list(scores)
    for other in names[1:]:
        (seeds_a, a, class_a), (seeds_b, b, class_b) = scores[names[0]], scores[other]
        if seeds_a != seeds_b:
            continue
        for split in ("validation", "test"):
            diff = np.subtract(a[split], b[split])
            by_class = np.subtract(class_a[split], class_b[split]).mean(0)
            print(f"{names[0]} - {other}, {split}: {diff.mean():+.2f} (per seed {', '.join(f'{d:+.2f}' for d in diff)}; "
                  f"per class, seed mean: {', '.join(f'{d:+.1f}' for d in by_class)})")


if __name__ == "__main__":
    main()
