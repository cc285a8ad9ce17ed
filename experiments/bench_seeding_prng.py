"""Benchmark: the barycenter seeding's counter-based hash PRNG against JAX's own keys.

The k-means++ seeding (``wmdd_jax/barycenter/seeding.py``) needs O(k * trials * n) uniform numbers,
and point ``i`` must get the same number whatever the padding of its class, so the numbers are a
function of ``(seed, step, index)``. Two ways to get that:

  hash      ``_hash_uniform``: MurmurHash3's finaliser over the key words, step and index (the code)
  fold_in   ``jax.random.uniform(fold_in(fold_in(key, step), index))``: one threefry key per point,
            vmapped over the indices (the same padding-independence, JAX's own PRNG)

For each, in one process, round-robin: jit lowering + compile time (the lower of two) and the median run time of the
public ``kmeans_plus_plus`` and of ``free_support_barycenter`` (uniform weights, the default, whose
seeding runs once; and learned weights, whose 10 k-means restarts each seed anew), on one class of
``n`` points in ``d`` dimensions (Gaussian), ``m`` support points. Rows go to
``experiments/results/bench_seeding_prng.jsonl``.

Usage: python experiments/bench_seeding_prng.py [--cells 6000x512x10,6000x512x50] [--repeats 5]
"""

import argparse
import datetime
import json
import os
import sys
import time
import warnings

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from wmdd_jax import barycenter  # noqa: E402
from wmdd_jax.barycenter import seeding  # noqa: E402

HASH_UNIFORM = seeding._hash_uniform


def fold_in_uniform(seed, step, index, dtype):
    """``_hash_uniform``'s contract (a pure function of seed words, step and index) by JAX keys."""
    key = jax.random.key(0)
    for word in seed:
        key = jax.random.fold_in(key, word)
    key = jax.random.fold_in(key, step)
    flat = index.reshape(-1)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (), dtype, minval=2.0**-25))(flat)
    return u.reshape(index.shape)


PRNGS = {"hash": HASH_UNIFORM, "fold_in": fold_in_uniform}


def ops(m):
    return {
        "kmeans_plus_plus": lambda x: barycenter.kmeans_plus_plus(x, m),
        "uniform_barycenter": lambda x: barycenter.free_support_barycenter(x, m).support,
        "learned_weights_barycenter": lambda x: barycenter.free_support_barycenter(x, m, learn_weights=True).support,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="6000x512x10,6000x512x50", help="n x d x m, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_seeding_prng.jsonl"))
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    args = p.parse_args()
    command = "python experiments/bench_seeding_prng.py " + " ".join(sys.argv[1:])
    rows = []
    for cell in args.cells.split(","):
        n, d, m = (int(v) for v in cell.split("x"))
        x = jax.random.normal(jax.random.key(1), (n, d))
        for op_name in ops(m):
            compiled, compile_s, times, outputs = {}, {n: [] for n in PRNGS}, {n: [] for n in PRNGS}, {}
            for _ in range(2):  # twice each, alternating: the process's first compile also warms JAX up
                for name, fn in PRNGS.items():
                    seeding._hash_uniform = fn  # the seeding looks the name up when it is traced
                    op = ops(m)[op_name]  # a new function: jit caches traces by function
                    start = time.perf_counter()
                    compiled[name] = jax.jit(op).lower(x).compile()
                    compile_s[name].append(time.perf_counter() - start)
                    outputs[name] = np.asarray(compiled[name](x))  # warm-up, and a finiteness check
            seeding._hash_uniform = HASH_UNIFORM
            for _ in range(args.repeats):  # round-robin: load changes hit both alike
                for name in PRNGS:
                    start = time.perf_counter()
                    jax.block_until_ready(compiled[name](x))
                    times[name].append(time.perf_counter() - start)
            for name in PRNGS:
                row = {"benchmark": "seeding_prng", "op": op_name, "prng": name, "n": n, "d": d, "m": m,
                       "compile_s": round(min(compile_s[name]), 3),
                       "run_s_median": round(float(np.median(times[name])), 4),
                       "run_s_min_max": [round(min(times[name]), 4), round(max(times[name]), 4)],
                       "repeats": args.repeats, "finite": bool(np.isfinite(outputs[name]).all()),
                       "load_avg_1m": round(os.getloadavg()[0], 2), "jax": jax.__version__,
                       "command": command.strip(), "date": datetime.date.today().isoformat(),
                       "machine": args.machine}
                rows.append(row)
                print(f"{op_name:27s} n={n} d={d} m={m:3d} {name:8s} compile {row['compile_s']:6.2f} s  "
                      f"run {row['run_s_median']:.4f} s", flush=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
