"""How far apart the sharded runs of tests/test_sharding.py end: 1 device, 8 devices, a 2 x 4 mesh,
and 2 processes x 4 devices (killed after the first checkpoint and restarted).

Each repeat runs the whole chain from scratch in a fresh folder (teacher, statistics, barycenters,
20 synthesis steps) and records the largest absolute pixel gap between each pair of runs, so the
spread over repeats says which tolerance the test can hold on this machine.

    PYTHONPATH=. .venv/bin/python experiments/sharding_agreement.py --repeats 5

One JSON line per repeat goes to experiments/results/sharding_agreement.jsonl as soon as it is done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments.fashion_mnist_wmdd import code_commit  # noqa: E402
from tests.test_sharding import ITERATIONS, prepare, run_two_processes  # noqa: E402
from wmdd_jax.results import command_line  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "results" / "sharding_agreement.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.machine()})")
    args = parser.parse_args()
    commit = code_commit()
    for repeat in range(args.repeats):
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="wmdd-sharding-") as tmp:
            root = pathlib.Path(tmp)
            images = prepare(root)
            (root / "two").mkdir()
            joined, _ = run_two_processes(root, root / "two")

        def gap(a, b):
            return float(np.max(np.abs(a - b)))

        row = {"benchmark": "sharding_agreement", "repeat": repeat, "synthesis_steps": ITERATIONS,
               "max_abs_gap": {"eight_vs_one": gap(images["eight"], images["one"]),
                               "two_axes_vs_eight": gap(images["two_axes"], images["eight"]),
                               "two_processes_vs_one": gap(joined, images["one"]),
                               "two_processes_vs_eight": gap(joined, images["eight"])},
               "seconds": round(time.time() - t0, 1), "machine": args.machine, "command": command_line(),
               "code_commit": commit,
               "date": datetime.date.today().isoformat()}
        print(json.dumps(row), flush=True)
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
