"""Images per second of one ConvNet-3 training step and one synthesis step, on CPU.

Times, side by side in one process (round-robin, so the load of a shared
machine hits every candidate alike), the median of ``--repeats`` steps of:

* ``train_step``: ConvNet-3 (width 128, 28x28x1 inputs, batch 256), softmax
  cross-entropy, ``value_and_grad`` and SGD with momentum, one jitted step, for
  instance norm and batch norm, with every JAX convolution (``--impls``) and,
  when ``torch`` is importable, the same PyTorch step (``nn.Conv2d`` +
  ``GroupNorm(128, 128)`` / ``BatchNorm2d``, average pooling, linear, SGD).
* ``synthesis_step``: the WMDD image update: a frozen batch-norm teacher in
  eval mode, loss = cross-entropy + matching of the batch statistics sown in
  ``bn_stats`` to the running statistics, gradient to the pixels of a batch of
  100 images, Adam on the pixels (PyTorch: the same with forward hooks).

Appends one JSON object per (benchmark, impl, norm) to ``--out``.

Usage:
  PYTHONPATH=. .venv/bin/python experiments/bench_train_step.py
  PYTHONPATH=. .venv/bin/python experiments/bench_train_step.py --host-allocator default
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="lax,im2col,winograd", help="JAX conv_impl values to time")
    p.add_argument("--norms", default="instance,batch")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per candidate")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--synth-batch", type=int, default=100)
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when importable")
    p.add_argument("--no-synthesis", action="store_true")
    p.add_argument("--host-allocator", choices=("tuned", "default"), default="tuned",
                   help="'tuned' applies tune_host_allocator() before jax starts")
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU",
                   help="what the results row says of the machine, e.g. whether other jobs shared it")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_train_step.jsonl"))
    return p.parse_args(argv)


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wmdd_jax.host import tune_host_allocator  # noqa: E402  (imports no jax)

ARGS = parse_args(sys.argv[1:])
if ARGS.host_allocator == "tuned":
    tune_host_allocator()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from wmdd_jax.results import code_commit  # noqa: E402
from wmdd_jax.models.convnet import ConvNet3  # noqa: E402
from wmdd_jax.models.norms import BN_STATS, collect_bn_moments, pooled_moments  # noqa: E402

NUM_CLASSES, WIDTH, IMAGE = 10, 128, (28, 28, 1)
LR, MOMENTUM, BN_WEIGHT = 0.01, 0.9, 1.0


def data(batch, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(batch, *IMAGE).astype(np.float32), rng.randint(0, NUM_CLASSES, batch)


# ---------------------------------------------------------------- JAX

def jax_train_step(impl, norm, batch):
    """Returns (step, state): ``state = step(*state)[:3]`` runs one SGD step."""
    model = ConvNet3(num_classes=NUM_CLASSES, width=WIDTH, norm=norm, conv_impl=impl)
    x, y = (jnp.asarray(a) for a in data(batch))
    variables = model.init(jax.random.PRNGKey(0), x, train=True)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(LR, momentum=MOMENTUM)

    def loss_fn(params, batch_stats):
        if norm == "batch":
            logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            batch_stats = new["batch_stats"]
        else:
            logits = model.apply({"params": params}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), batch_stats

    @jax.jit
    def step(params, opt_state, batch_stats):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, batch_stats, loss

    return step, (params, tx.init(params), batch_stats)


def jax_synthesis_step(impl, batch):
    """WMDD-style image update against a frozen batch-norm teacher."""
    teacher = ConvNet3(num_classes=NUM_CLASSES, width=WIDTH, norm="batch", conv_impl=impl)
    x0, y = data(batch, seed=1)
    variables = teacher.init(jax.random.PRNGKey(1), jnp.asarray(x0), train=False)
    # Non-trivial running statistics, as a trained teacher would have.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.1 if "mean" in jax.tree_util.keystr(path) else v, variables)
    y = jnp.asarray(y)
    tx = optax.adam(0.05)
    stats = variables["batch_stats"]

    def loss_fn(images):
        logits, state = teacher.apply(variables, images, train=False, mutable=[BN_STATS])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        for path, (m, v) in collect_bn_moments(state).items():
            mu, var = pooled_moments(m, v)
            ra = stats[path.split("/")[0]]
            loss += BN_WEIGHT * (jnp.sum(jnp.square(mu - ra["mean"])) + jnp.sum(jnp.square(var - ra["var"])))
        return loss

    @jax.jit
    def step(images, opt_state):
        loss, g = jax.value_and_grad(loss_fn)(images)
        updates, opt_state = tx.update(g, opt_state, images)
        return optax.apply_updates(images, updates), opt_state, loss

    images = jnp.asarray(x0)
    return step, (images, tx.init(images))


# ---------------------------------------------------------------- PyTorch

def torch_convnet(torch, norm):
    nn = torch.nn
    layers, c = [], IMAGE[2]
    for _ in range(3):
        layers += [nn.Conv2d(c, WIDTH, 3, padding=1),
                   nn.GroupNorm(WIDTH, WIDTH) if norm == "instance" else nn.BatchNorm2d(WIDTH),
                   nn.ReLU(), nn.AvgPool2d(2)]
        c = WIDTH
    side = IMAGE[0] // 8
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(WIDTH * side * side, NUM_CLASSES))


def torch_train_step(torch, norm, batch):
    model = torch_convnet(torch, norm).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = data(batch)
    x, y = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def torch_synthesis_step(torch, batch):
    model = torch_convnet(torch, "batch").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    bns = [m for m in model if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.running_mean += 0.1
    moments = []

    def hook(module, inputs, output):
        a = inputs[0]
        moments.append((module, a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False)))

    for bn in bns:
        bn.register_forward_hook(hook)
    x0, y = data(batch, seed=1)
    images = torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    y = torch.from_numpy(y)
    opt = torch.optim.Adam([images], lr=0.05)

    def step():
        moments.clear()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), y)
        for bn, m, v in moments:
            loss = loss + BN_WEIGHT * (torch.sum((m - bn.running_mean) ** 2) + torch.sum((v - bn.running_var) ** 2))
        loss.backward()
        opt.step()
        return loss

    return step


# ---------------------------------------------------------------- timing

class Candidate:
    """One step to time; ``run()`` does one step and waits for it."""

    def __init__(self, benchmark, impl, norm, batch, run):
        self.benchmark, self.impl, self.norm, self.batch, self.run = benchmark, impl, norm, batch, run
        self.seconds: list[float] = []


def jax_candidate(benchmark, impl, norm, batch, step, state, keep):
    holder = [state]

    def run():
        holder[0] = step(*holder[0])[:keep]
        jax.block_until_ready(holder[0])

    return Candidate(benchmark, impl, norm, batch, run)


def build_candidates(args):
    cands = []
    impls = [i for i in args.impls.split(",") if i]
    norms = [n for n in args.norms.split(",") if n]
    for norm in norms:
        for impl in impls:
            step, state = jax_train_step(impl, norm, args.batch)
            cands.append(jax_candidate("train_step", impl, norm, args.batch, step, state, keep=3))
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch not importable: skipping the PyTorch side", file=sys.stderr)
    if torch is not None:
        torch.manual_seed(0)
        for norm in norms:
            cands.append(Candidate("train_step", "pytorch", norm, args.batch, torch_train_step(torch, norm, args.batch)))
    if not args.no_synthesis:
        for impl in impls:
            step, state = jax_synthesis_step(impl, args.synth_batch)
            cands.append(jax_candidate("synthesis_step", impl, "batch", args.synth_batch, step, state, keep=2))
        if torch is not None:
            cands.append(Candidate("synthesis_step", "pytorch", "batch", args.synth_batch,
                                   torch_synthesis_step(torch, args.synth_batch)))
    return cands


def main(args):
    t0 = time.perf_counter()
    cands = build_candidates(args)
    for c in cands:  # compile and warm up (also lets the allocator settle)
        for _ in range(1 + args.warmup):
            c.run()
    print(f"built and warmed {len(cands)} candidates in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for _ in range(args.repeats):  # round-robin: load changes hit every candidate alike
        for c in cands:
            start = time.perf_counter()
            c.run()
            c.seconds.append(time.perf_counter() - start)
    command = "PYTHONPATH=. .venv/bin/python experiments/bench_train_step.py " + " ".join(sys.argv[1:])
    commit = code_commit()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        for c in cands:
            rates = [c.batch / s for s in c.seconds]
            record = {
                "benchmark": c.benchmark, "impl": c.impl, "norm": c.norm, "batch": c.batch,
                "images_per_s": round(float(np.median(rates)), 1), "repeats": len(rates),
                "min_max_images_per_s": [round(min(rates), 1), round(max(rates), 1)],
                "host_allocator": args.host_allocator,
                "command": command.strip(), "code_commit": commit, "date": datetime.date.today().isoformat(),
                "machine": args.machine,
            }
            f.write(json.dumps(record) + "\n")
            print(f"{c.benchmark:15s} {c.impl:9s} {c.norm:9s} batch {c.batch:4d}: "
                  f"{record['images_per_s']:7.1f} images/s (range {min(rates):.0f}-{max(rates):.0f})")
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(ARGS)
