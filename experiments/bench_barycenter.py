"""Benchmark: free-support W2 barycenters, this project vs OTT-JAX vs POT.

For every cell (n points per class, d = 512, m support points, a batch of 1 or 10 classes) each
method computes one barycenter per class; we record the compile time, the median run time and the
exact W2^2 between each class's points and the result (POT ``emd2``, float64, mean over classes).

Data: synthetic "penultimate features": ReLU(W z + 0.5) + 0.3 |noise| with z drawn from a 10-component
Gaussian mixture in 32 dimensions and W a random 32 -> 512 map (non-negative, anisotropic, clustered,
like global-average-pooled ResNet features). One class = one draw of the generator with seed = class index.

Rows:
  wmdd_uniform_weights   barycenter.free_support_barycenter, defaults (annealed, warm-started Sinkhorn)
  wmdd_uniform_weights_vmap   the same, the batch in one vmap instead of lax.map (batch cells only)
  wmdd_learned_weights   the same with learn_weights=True (weighted k-means, 10 restarts)
  ott_fwb_default        OTT FreeWassersteinBarycenter(Sinkhorn()) with every default (epsilon = 0.05 std of
                         the cost, random initial points)
  ott_fwb_tuned          OTT FreeWassersteinBarycenter at *our* final epsilon (points normalised as ours are,
                         epsilon = epsilon_end), started from our k-means++ seeding, over-relaxed Sinkhorn
                         (momentum 1.6, as ours): the "same epsilon" reference for the run-time target
  pot_exact              POT ot.lp.free_support_barycenter (exact OT, numItermax 100) from our seeding
  pot_exact_normal_init  the same from b ~ N(0, I), as the official WMDD code starts

Batches: ours and OTT run the classes one after another with jax.lax.map inside one jit (on this CPU,
sequential beats one big vmap, whose loops wait for the slowest class: our vmap row shows by how much;
a vmapped batch of 10 OTT barycenters, n=500, m=10, took 90 s against 0.34 s for one class in a trial
on a loaded machine); POT loops over them in Python.

Timing: median of 5 runs (ours) / 3 runs (OTT, POT) for one class, 3 / 1 runs for a batch; compile_s
is jit lowering + XLA compilation. The machine is shared: each row records the 1-minute load average.
With --quick: 3 / 1 runs everywhere, and the OTT rows of the 1300x50x10 cell use 3 of the 10 classes
(their rows then say batch=3). The committed results: `python experiments/bench_barycenter.py`, 416 s.

Separated clouds (``--separated``): a few well-separated Gaussian clusters (k in 3..5,
unit spread, centres sep / sqrt(2) * N(0, I), d 128..512, n 200..2000, m no multiple of k, equal or
Dirichlet(2) cluster sizes). Per case, one row per uniform variant (``second_start`` on, the
default, and off: the annealed path alone, as before the fix) with the exact W2^2 of ours and its
ratio to POT's exact fixed point started from our k-means++ seeding (``ratio_pot_seeding``) and from
4 random data-point starts (``ratio_pot_random_min`` / ``_median``); ``run_s`` one jitted call
after the compile. ``--separated`` runs only these cases.

Usage: python experiments/bench_barycenter.py [--quick] [--cells 500x10x1,...] [--out FILE]
       python experiments/bench_barycenter.py --separated --append
"""

import argparse
import datetime
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wmdd_jax.results import code_commit  # noqa: E402
from wmdd_jax import barycenter  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from ott.problems.linear import barycenter_problem  # noqa: E402
    from ott.solvers.linear import acceleration, continuous_barycenter, sinkhorn  # noqa: E402

import ot  # noqa: E402  (POT, the test extra)

DATE = datetime.date.today().isoformat()
MACHINE = "2-core CPU"
COMMIT = code_commit()
D = 512
EPSILON_END = 1e-3  # barycenter.free_support_barycenter's default, relative to the class variance
MOMENTUM = 1.6  # its default Sinkhorn over-relaxation


def class_features(seed: int, n: int, d: int = D, latent: int = 32, k: int = 10, noise: float = 0.3):
    """[n, d] float32 synthetic features of one class (see the module docstring)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, latent)) * 1.5
    comp = rng.choice(k, size=n, p=rng.dirichlet(np.ones(k)))
    z = means[comp] + rng.normal(size=(n, latent))
    w = rng.normal(size=(latent, d)) / np.sqrt(latent)
    h = np.maximum(z @ w + 0.5, 0.0) + noise * np.abs(rng.normal(size=(n, d)))
    return h.astype(np.float32)


def exact_w2(points: np.ndarray, support: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Exact W2^2 (network simplex, float64) between uniform points and a weighted support."""
    x, y = points.astype(np.float64), support.astype(np.float64)
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y)) if weights is None else np.asarray(weights, np.float64)
    return float(ot.emd2(a, b / b.sum(), ot.dist(x, y), numItermax=10**7))


def normalise(points):
    """(points - centre) / scale with unit total variance, as the barycenter module does."""
    centre = points.mean(axis=0)
    scale = jnp.sqrt(jnp.mean(jnp.sum((points - centre) ** 2, axis=-1)))
    return (points - centre) / scale, centre, scale


# ----------------------------------------------------------------------------------------- methods
# Each factory returns a jittable f(points [n, d], key) -> (support [m, d], weights [m], cost []) for
# one class; cost is the method's own W2^2 estimate (NaN where it has none comparable).


def ours(m: int, learn_weights: bool):
    def f(points, key):
        res = barycenter.free_support_barycenter(points, m, rng=key, learn_weights=learn_weights)
        return res.support, res.weights, res.cost
    return f


def ott_fwb(m: int, tuned: bool):
    def f(points, key):
        n = points.shape[0]
        if tuned:
            init = barycenter.kmeans_plus_plus(points, m, rng=key)
            y, centre, scale = normalise(points)
            x_init = (init - centre) / scale
            linear = sinkhorn.Sinkhorn(momentum=acceleration.Momentum(value=MOMENTUM))
            epsilon = EPSILON_END
        else:
            y, centre, scale, x_init = points, 0.0, 1.0, None
            linear, epsilon = sinkhorn.Sinkhorn(), None
        prob = barycenter_problem.FreeBarycenterProblem(
            y=y[None], b=jnp.full((1, n), 1.0 / n, y.dtype), epsilon=epsilon)
        out = continuous_barycenter.FreeWassersteinBarycenter(linear)(prob, bar_size=m, x_init=x_init, rng=key)
        return centre + scale * out.x, out.a, jnp.nan
    return f


def time_jax(f, batch_points, keys, runs: int, batching: str = "map"):
    """(compile_s, median run_s, support, weights, cost) of f jitted over one class, or over a batch
    with jax.lax.map (sequential, `map`) or jax.vmap (`vmap`) inside the jit."""
    single = batch_points.shape[0] == 1
    if single:
        fn, args = jax.jit(f), (batch_points[0], keys[0])
    elif batching == "vmap":
        fn, args = jax.jit(jax.vmap(f)), (batch_points, keys)
    else:
        fn, args = jax.jit(lambda p, k: jax.lax.map(lambda a: f(*a), (p, k))), (batch_points, keys)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    support, weights, cost = (np.asarray(v) for v in out)
    if single:
        support, weights, cost = support[None], weights[None], cost[None]
    return compile_s, float(np.median(times)), support, weights, cost


def time_pot(batch_points, inits, runs: int):
    """POT's exact fixed point, one class after another, from the given initial supports."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        support = []
        for x, init in zip(batch_points, inits):
            x = x.astype(np.float64)
            support.append(ot.lp.free_support_barycenter(
                [x], [np.full(len(x), 1.0 / len(x))], init.astype(np.float64), numItermax=100))
        times.append(time.perf_counter() - t0)
    support = np.stack(support)
    weights = np.full(support.shape[:2], 1.0 / support.shape[1])
    return None, float(np.median(times)), support, weights, np.full(len(support), np.nan)


# ------------------------------------------------------------------------------------------- cells


def run_cell(n, m, batch, runs_jax, runs_slow, command, out_file, methods, ott_max_classes):
    batch_points = np.stack([class_features(c, n) for c in range(batch)])
    keys = jax.random.split(jax.random.key(0), batch)
    seeds = jax.jit(jax.vmap(lambda p, k: barycenter.kmeans_plus_plus(p, m, rng=k)))
    kpp_init = np.asarray(seeds(batch_points, keys))
    normal_init = np.random.default_rng(1).normal(size=(batch, m, D))
    rows = []
    for method in methods:
        note, classes, runs = "", batch, runs_jax
        if method.startswith("ott") and batch > ott_max_classes:
            classes = ott_max_classes
            note = f"OTT on the first {classes} of the {batch} classes (time budget; lax.map: time is linear)"
        points_run, keys_run = batch_points[:classes], keys[:classes]
        if method == "wmdd_uniform_weights":
            res = time_jax(ours(m, False), points_run, keys_run, runs)
        elif method == "wmdd_uniform_weights_vmap":
            if batch == 1:
                continue
            res = time_jax(ours(m, False), points_run, keys_run, runs, batching="vmap")
        elif method == "wmdd_learned_weights":
            res = time_jax(ours(m, True), points_run, keys_run, runs)
        elif method == "ott_fwb_default":
            runs = runs_slow
            res = time_jax(ott_fwb(m, False), points_run, keys_run, runs)
        elif method == "ott_fwb_tuned":
            runs = runs_slow
            res = time_jax(ott_fwb(m, True), points_run, keys_run, runs)
        elif method == "pot_exact":
            runs = runs_slow
            res = time_pot(points_run, kpp_init, runs)
        elif method == "pot_exact_normal_init":
            runs = runs_slow
            res = time_pot(points_run, normal_init, runs)
        else:
            raise ValueError(method)
        compile_s, run_s, support, weights, cost = res
        w2 = [exact_w2(x, s, w) for x, s, w in zip(points_run, support, weights)]
        row = dict(benchmark="barycenter", method=method, n=n, d=D, m=m, batch=classes,
                   batching="single" if classes == 1 else ("vmap" if method.endswith("vmap") else
                                                           "python loop" if method.startswith("pot")
                                                           else "lax.map"),
                   compile_s=None if compile_s is None else round(compile_s, 3), run_s=round(run_s, 4),
                   runs=runs, w2_exact=round(float(np.mean(w2)), 4),
                   w2_exact_per_class=[round(v, 4) for v in w2],
                   cost_reported=None if np.isnan(cost).all() else round(float(np.mean(cost)), 4),
                   data="synthetic relu(latent 10-GMM) features", dtype="float32 (POT float64)",
                   note=note, load_avg_1m=round(os.getloadavg()[0], 2), jax=jax.__version__,
                   command=command, code_commit=COMMIT, date=DATE, machine=MACHINE)
        rows.append(row)
        print(f"n={n:5d} m={m:3d} batch={classes:2d} {method:26s} compile {row['compile_s']} s  run {run_s:8.3f} s"
              f"  W2^2 {row['w2_exact']:.3f}  (load {row['load_avg_1m']})", flush=True)
        out_file.write(json.dumps(row) + "\n")
        out_file.flush()
    return rows


# (seed, clusters k, d, n, m, unequal sizes, sep): m no multiple of k; cluster gaps ~ sep * sqrt(d)
# against a within-cluster spread of sqrt(d).
SEPARATED = [
    (0, 3, 128, 300, 4, False, 8.0), (1, 3, 128, 300, 5, False, 8.0), (2, 3, 256, 600, 7, True, 8.0),
    (3, 4, 256, 800, 5, False, 8.0), (4, 4, 512, 1000, 10, True, 8.0), (5, 5, 128, 400, 7, True, 8.0),
    (6, 5, 512, 2000, 12, False, 8.0), (7, 3, 512, 1500, 10, True, 8.0), (8, 4, 128, 200, 6, True, 8.0),
    (1, 3, 128, 150, 5, False, 20.0), (3, 3, 128, 300, 5, True, 20.0),
]


def separated_cloud(seed, k, d, n, unequal, sep):
    """[n, d] float32: k unit Gaussians, centres sep / sqrt(2) * N(0, I) (the tests' generator)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep / np.sqrt(2)
    p = rng.dirichlet(np.ones(k) * 2) if unequal else np.full(k, 1.0 / k)
    return (centres[rng.choice(k, size=n, p=p)] + rng.normal(size=(n, d))).astype(np.float32)


def run_separated(command, out_file):
    for seed, k, d, n, m, unequal, sep in SEPARATED:
        x = separated_cloud(seed, k, d, n, unequal, sep)
        key = jax.random.key(0)
        seeding = np.asarray(barycenter.kmeans_plus_plus(x, m, rng=key))
        pot_seed = exact_w2(x, time_pot(x[None], seeding[None], 1)[2][0])
        starts = [x[np.random.default_rng(100 + s).choice(n, m, replace=False)] for s in range(4)]
        pot_random = [exact_w2(x, time_pot(x[None], b[None], 1)[2][0]) for b in starts]
        for second in (True, False):
            f = jax.jit(lambda p: barycenter.free_support_barycenter(p, m, rng=key, second_start=second))
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = jax.block_until_ready(f(x))
            run_s = time.perf_counter() - t0
            ours = exact_w2(x, np.asarray(res.support))
            row = dict(benchmark="barycenter_separated", method="wmdd_uniform_weights" if second else
                       "wmdd_uniform_weights_annealed_only", seed=seed, clusters=k, n=n, d=d, m=m,
                       unequal_sizes=unequal, sep=sep, w2_exact=round(ours, 4),
                       cost_reported=round(float(res.cost), 4), converged=bool(res.converged),
                       w2_pot_seeding=round(pot_seed, 4), w2_pot_random=[round(v, 4) for v in pot_random],
                       ratio_pot_seeding=round(ours / pot_seed, 5),
                       ratio_pot_random_min=round(ours / min(pot_random), 5),
                       ratio_pot_random_median=round(ours / float(np.median(pot_random)), 5),
                       compile_plus_run_s=round(compile_s, 3), run_s=round(run_s, 4),
                       data="separated Gaussian clusters", dtype="float32 (POT float64)",
                       load_avg_1m=round(os.getloadavg()[0], 2), jax=jax.__version__, command=command,
                       code_commit=COMMIT, date=DATE, machine=MACHINE)
            print(f"k={k} d={d:4d} n={n:5d} m={m:3d} sep={sep:4.0f} {row['method']:34s} "
                  f"ours/POT(seeding) {row['ratio_pot_seeding']:.5f}  ours/POT(random) min "
                  f"{row['ratio_pot_random_min']:.5f} median {row['ratio_pot_random_median']:.5f}  "
                  f"run {run_s:.2f} s", flush=True)
            out_file.write(json.dumps(row) + "\n")
            out_file.flush()


METHODS = ["wmdd_uniform_weights", "wmdd_uniform_weights_vmap", "wmdd_learned_weights", "ott_fwb_default",
           "ott_fwb_tuned", "pot_exact", "pot_exact_normal_init"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer timing runs (ours 3, OTT/POT 1), for a shared 2-core machine")
    parser.add_argument("--cells", default="500x10x1,500x50x1,1300x10x1,1300x50x1,"
                                           "500x10x10,500x50x10,1300x10x10,1300x50x10",
                        help="comma-separated NxMxBATCH")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "bench_barycenter.jsonl"))
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--separated", action="store_true",
                        help="run only the separated-cluster cases, not the cells")
    parser.add_argument("--ott-max-classes", type=int, default=10,
                        help="run the OTT rows of a batch cell on at most this many classes")
    args = parser.parse_args()
    command = " ".join(["python experiments/bench_barycenter.py"] + sys.argv[1:])
    methods = args.methods.split(",")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_start = time.perf_counter()
    with open(args.out, "a" if args.append else "w") as out_file:
        if args.separated:
            run_separated(command, out_file)
            print(f"total {time.perf_counter() - t_start:.0f} s")
            return
        for cell in args.cells.split(","):
            n, m, batch = (int(v) for v in cell.split("x"))
            if args.quick:
                runs_jax, runs_slow = 3, 1
            else:
                runs_jax, runs_slow = (5, 3) if batch == 1 else (3, 1)
            # OTT is the slow part at n=1300, m=50 (seconds per class on an idle machine, minutes
            # on a loaded one): in --quick mode its batch rows there run on 3 classes.
            ott_max = args.ott_max_classes if not (args.quick and n * m >= 1300 * 50) else min(
                3, args.ott_max_classes)
            run_cell(n, m, batch, runs_jax, runs_slow, command, out_file, methods, ott_max)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
