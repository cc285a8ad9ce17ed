"""WMDD and its ablations against random real on Fashion-MNIST (the test-split rows).

For each IPC and method, runs ``python -m wmdd_jax all`` in its own work directory
(``ROOT/<method>_ipc<ipc>``), reusing a finished teacher (``--teacher``; by default the one
committed in experiments/teachers/), resumably (rerun the same command after an interruption).
Each finished (method, IPC, label mode) cell is written at once to
experiments/results/fashion_mnist.jsonl with its stage wall times, its teacher and the commit of
the code that ran it.

    python experiments/fashion_mnist_wmdd.py --root ~/wmdd-runs/fmnist-wmdd \\
        [--teacher DIR] [--ipcs 1 10 50] [--methods wmdd no_barycenter] \\
        [--copy-from ~/wmdd-runs/earlier-root] \\
        [--config.KEY=VALUE ...]  # overrides for every run

``--copy-from`` starts each work directory as a copy of the same (method, IPC) directory under an
earlier root, so that a new student recipe (``--config.eval.*`` overrides) is measured on the very
synthetic set of that run; only the students are trained anew. Such rows say so in ``copied_from``.
A stage timed before this command ran (in a copy, or by an earlier command in the same work
directory, e.g. another label mode) keeps its first time: the row lists those stages in
``stages_timed_earlier``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wmdd_jax import results  # noqa: E402

# The committed teacher: `python -m wmdd_jax pretrain --config=configs/fashion_mnist.py`, 92.67% test.
TEACHER = os.path.join(ROOT, "experiments", "teachers", "fashion_mnist_convnet3_bn")
OUT = os.path.join(ROOT, "experiments", "results", "fashion_mnist.jsonl")
METHODS = {  # method name -> config overrides (ablations are config switches)
    "wmdd": [],
    "no_barycenter": ["--config.synthesis.use_barycenter=False"],
    "wmdd_learned_weights": ["--config.barycenter.learn_weights=True"],
    "wmdd_global_bn": ["--config.synthesis.per_class_bn=False"],
    "wmdd_noise_init": ["--config.synthesis.init=noise"],
    # the real images WMDD starts from (nearest each barycenter point), not optimised: selection alone
    "barycenter_real": ["--config.synthesis.iterations=0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="one work directory per (method, ipc) goes under it")
    parser.add_argument("--teacher", default=TEACHER,
                        help="a finished teacher folder (from pretrain); default: the committed teacher")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[10, 50, 1])
    parser.add_argument("--methods", nargs="+", default=["wmdd", "no_barycenter"])
    parser.add_argument("--label-modes", default="('soft','hard')")
    parser.add_argument("--seeds", default="(0,1,2)")
    parser.add_argument("--machine", default="2-core CPU",
                        help="what the rows say of the machine (their stage_seconds), e.g. that other jobs shared it")
    parser.add_argument("--copy-from", default=None, metavar="EARLIER_ROOT",
                        help="start each work directory as a copy of EARLIER_ROOT/<method>_ipc<ipc> (same "
                             "teacher and synthesis settings; only --config.eval.* overrides may differ)")
    args, extra = parser.parse_known_args()
    if any(not a.startswith("--config.") for a in extra):
        parser.error(f"unknown arguments {[a for a in extra if not a.startswith('--config.')]}; "
                     "besides the options above, only --config.KEY=VALUE overrides (passed to every run)")

    modes = ast.literal_eval(args.label_modes)
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(m not in ("soft", "hard") for m in modes):
        parser.error(f"--label-modes must be a tuple of 'soft' and/or 'hard', got {args.label_modes!r}")

    def keys(overrides):
        return {o.split("=", 1)[0] for o in overrides}

    for method in args.methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; --methods takes any of {sorted(METHODS)}")
        clash = keys(METHODS[method]) & keys(extra)
        if clash:
            parser.error(f"{sorted(clash)} would override what makes {method!r} itself; run it without them")

    commit = results.code_commit()
    teacher = os.path.relpath(os.path.abspath(args.teacher), ROOT)
    # A copied work directory holds the source run's synthetic set: the synthesis overrides are its.
    synthesis = " ".join(a[len("--config."):] for a in extra if not a.startswith("--config.eval."))
    for ipc in args.ipcs:
        for method in args.methods:
            workdir = os.path.join(args.root, f"{method}_ipc{ipc}")
            copied_from = None
            if args.copy_from is not None:
                source = os.path.join(args.copy_from, f"{method}_ipc{ipc}")
                if not os.path.isdir(os.path.join(source, "synthetic")):
                    sys.exit(f"--copy-from: {source} holds no finished synthetic set; run it first or drop "
                             "--copy-from")
                if not os.path.exists(workdir):
                    shutil.copytree(source, workdir + ".copying", ignore=shutil.ignore_patterns(".lock"))
                    os.replace(workdir + ".copying", workdir)
                copied_from = {"method": method, "ipc": ipc, "synthesis_overrides": synthesis}
            timings_path = os.path.join(workdir, "timings.json")
            timed_before = set()
            if os.path.exists(timings_path):
                with open(timings_path) as f:
                    timed_before = set(json.load(f))
            overrides = [f"--config.teacher.checkpoint={args.teacher}", f"--config.ipc={ipc}",
                         f"--config.synthesis.method={method}", f"--config.eval.label_modes={args.label_modes}",
                         f"--config.eval.seeds={args.seeds}", *METHODS[method], *extra]
            cmd = [sys.executable, "-m", "wmdd_jax", "all", "--config=configs/fashion_mnist.py",
                   f"--workdir={workdir}", *overrides]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            shown = " ".join(["python -m wmdd_jax all --config=configs/fashion_mnist.py --workdir=WORKDIR",
                              *[f'"{o}"' if "(" in o else o
                                for o in (v.replace(ROOT + os.sep, "") for v in overrides)]])
            with open(timings_path) as f:
                timings = json.load(f)
            summary = results.read_jsonl(os.path.join(workdir, "eval", "summary.jsonl"))
            for mode in modes:  # only the modes this command ran: `shown` is their command
                rows = [r for r in summary if r["label_mode"] == mode and r["ipc"] == ipc]
                if rows:
                    row = dict(rows[-1], command=shown, stage_seconds=timings, machine=args.machine)
                    if extra:  # a recipe other than the config's: its own row, named by its overrides
                        row["variant"] = " ".join(a[len("--config."):] for a in extra)
                    row["teacher"] = teacher  # synthesis targets, soft labels
                    # The pipeline keeps a stage's first time: name the stages this command did not time.
                    earlier = [stage for stage in timings if stage in timed_before]
                    if earlier:
                        row["stages_timed_earlier"] = earlier
                    if copied_from is not None:
                        row["copied_from"] = copied_from
                    row["code_commit"] = commit
                    results.upsert_jsonl(OUT, row, keys=(*results.KEY_FIELDS, "variant", "teacher"))
                    print(f"{method} ipc={ipc} {mode}: {row['mean']} ± {row['std']} ({row['n_seeds']} seeds)",
                          flush=True)


if __name__ == "__main__":
    main()
