"""Wall time of the ``recover`` stage on Fashion-MNIST, for this checkout and others side by side.

Prepares once, in ``--workdir`` (outside the repository), the statistics and barycenters of the committed
teacher (``experiments/teachers/fashion_mnist_convnet3_bn``) at each IPC of ``--ipcs``; then, for
``--repeats`` rounds, runs ``python -m wmdd_jax recover`` (``--iterations`` synthesis steps, a fresh copy
of that work directory each time) with the code of every checkout in ``--code`` in turn, the order
rotated each round. A row per (IPC, checkout) goes to ``--out`` when its rounds are done: the command's
wall seconds per round (start-up, loading and compilation included, as a user waits for them) and the
stage's own seconds (its message ``recover: ... in X s``: restoring, compiling and the steps), the best
and all rounds, the checkout's commit, and the machine's stolen CPU share during each run (a shared
VM's hidden load; /proc/stat).

    python experiments/bench_recover.py --workdir ~/wmdd-runs/bench_recover --code .,/work/before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "experiments", "teachers", "fashion_mnist_convnet3_bn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--code", default=".", help="comma-separated checkouts of this repository to time")
    p.add_argument("--ipcs", default="10,50")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "bench_recover.jsonl"))
    return p.parse_args(argv)


def _stolen() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def _commit(code: str) -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)experiments/results"], cwd=code, capture_output=True, text=True).stdout
    return out.stdout.strip() + (" + local changes" if dirty.strip() else "")


def _cli(code: str, stage: str, workdir: str, ipc: int, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "wmdd_jax", stage, "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
           f"--config.teacher.checkpoint={TEACHER}", f"--config.ipc={ipc}", "--config.compilation_cache.dir=",
           *extra]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(code))
    return subprocess.run(cmd, cwd=os.path.abspath(code), env=env, capture_output=True, text=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    codes = [os.path.abspath(c) for c in args.code.split(",")]
    for ipc in (int(i) for i in args.ipcs.split(",")):
        base = os.path.join(args.workdir, f"ipc{ipc}")
        for stage in ("statistics", "barycenter"):  # each skips itself when its files exist
            done = _cli(ROOT, stage, base, ipc)
            if done.returncode:
                sys.exit(done.stderr[-2000:])
        times = {c: [] for c in codes}
        for r in range(args.repeats):
            order = codes[r % len(codes):] + codes[: r % len(codes)]
            for code in order:
                run_dir = os.path.join(args.workdir, "run")
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns("synthetic"))
                s0, t0, w0 = *_stolen(), time.time()
                done = _cli(code, "recover", run_dir, ipc, [f"--config.synthesis.iterations={args.iterations}"])
                wall = time.time() - w0
                s1, t1 = _stolen()
                if done.returncode:
                    sys.exit(done.stderr[-2000:])
                stage = float(re.search(r"recover: \d+ images in (\d+) s", done.stdout).group(1))
                times[code].append((wall, stage, 100.0 * (s1 - s0) / max(t1 - t0, 1)))
                print(f"ipc {ipc} round {r} {code}: {wall:.1f} s wall, stage {stage:.0f} s", flush=True)
        with open(args.out, "a") as f:
            for code, ts in times.items():
                best = min(ts)
                f.write(json.dumps({
                    "benchmark": "recover", "dataset": "fashion_mnist", "ipc": ipc, "iterations": args.iterations,
                    "wall_s": round(best[0], 1), "stage_s": best[1], "steal_pct": round(best[2], 1),
                    "wall_s_all": [round(t[0], 1) for t in ts], "stage_s_all": [t[1] for t in ts],
                    "steal_pct_all": [round(t[2], 1) for t in ts], "repeats": args.repeats,
                    "code_commit": _commit(code), "machine": args.machine,
                    "command": "python experiments/bench_recover.py " + " ".join(sys.argv[1:]),
                    "date": datetime.date.today().isoformat()}) + "\n")


if __name__ == "__main__":
    main()
