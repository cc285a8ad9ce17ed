"""Does the students' initialisation explain the accuracy gap to the PyTorch loop of bench_evaluate.py?

With the real protocol (300 epochs) PyTorch's students ended 0.7 points higher at IPC 50 (88.77 vs
88.08, experiments/results/bench_evaluate.jsonl). Our ConvNet draws kaiming-normal convolutions,
LeCun-normal classifier and zero biases; PyTorch's nn.Conv2d / nn.Linear draw U(+-1/sqrt(fan_in))
for weights and biases (2.45x smaller convolution weights). This runs bench_evaluate.py's ``after``
variant (same seeds, subsets, teacher, recipe) with ``torch``: every conv/classifier weight and bias
redrawn from U(+-1/sqrt(fan_in)) after our init, or ``flax``: our init unchanged.
A scratch experiment (it execs bench_evaluate.py's definitions), kept as it made its rows (which
drew ``flax``: the models' init then, now ``--weight-init kaiming``). The library option it led to is
``weight_init`` (configs/default.py; ``torch`` the default): ``python experiments/bench_evaluate.py
--weight-init torch|kaiming`` measures the same question through it.

Usage: python experiments/init_gap.py IPC torch|flax   (appends a row to experiments/results/init_gap.jsonl)
"""
import sys, time, os, json
ipc, mode = int(sys.argv[1]), sys.argv[2]
sys.argv = ["bench", "--ipcs", str(ipc), "--epochs-fraction", "1", "--variants", "after", "--out", "/dev/null",
            "--weight-init", "kaiming"]  # the models' draw when these rows ran ("flax" below)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "bench_evaluate.py")
sys.path.insert(0, ROOT)
src = open(BENCH).read().split("if __name__")[0]
ns = {"__file__": BENCH, "__name__": "be"}
exec(compile(src, "be", "exec"), ns)
import jax, numpy as np
from wmdd_jax import train as T
orig = T.init_variables
def torch_like(model, rng, shape):
    v = orig(model, rng, shape)
    params = jax.tree_util.tree_flatten_with_path(v["params"])[0]
    key = jax.random.fold_in(rng, 12345)
    names = [tuple(getattr(p, "key", p) for p in path) for path, _ in params]
    flat = dict(zip(names, [a for _, a in params]))
    out = {}
    for i, (name, a) in enumerate(flat.items()):
        if name[0].startswith(("conv", "classifier")):
            fi = int(np.prod(flat[name[:-1] + ("kernel",)].shape[:-1]))
            b = 1.0 / np.sqrt(fi)
            a = jax.random.uniform(jax.random.fold_in(key, i), a.shape, a.dtype, -b, b)
        out[name] = a
    tree = {}
    for name, a in out.items():
        d = tree
        for p in name[:-1]:
            d = d.setdefault(p, {})
        d[name[-1]] = a
    return dict(v, params=tree)
if mode == "torch":
    T.init_variables = torch_like
ctx = ns["setup"]() + (None,)
t = time.perf_counter()
out = ns["run_jax"]("after", ctx, ipc)
row = dict(benchmark="init_gap", dataset="fashion_mnist", model="convnet3",
           label_mode="soft", metric="init_ablation_test_accuracy", ipc=ipc, init=mode, epochs=300, seeds=[0, 1, 2], accuracies=out["accuracies"], mean=float(np.mean(out["accuracies"])),
           std=float(np.std(out["accuracies"], ddof=1)), n_seeds=3, wall_s=time.perf_counter() - t)
print(json.dumps(row), flush=True)
open(os.path.join(ROOT, "experiments", "results", "init_gap.jsonl"), "a").write(json.dumps(row) + "\n")
