"""Wall time of the evaluate stage's student training: seeds one at a time, seeds stacked, PyTorch.

What is measured: training 3 evaluation students (seeds ``--seeds``) on Fashion-MNIST at each IPC
of ``--ipcs`` with the soft-label recipe of ``configs/fashion_mnist.py`` (``eval.soft``: AdamW 1e-3,
weight decay 0.01, cosine, batch 100, random-resized crop (0.08, 1) + flip, KL to the committed
teacher ``experiments/teachers/fashion_mnist_convnet3_bn`` at T=20, run online), ConvNet-3 students
(instance norm, width 128), and testing each on the test split. The images of seed s are the random
real subset ``random_subset(train, ipc, s)`` (training on it costs what a synthetic set of that size
costs). Epochs: ``--epochs-fraction`` of the recipe's 300 (1 = the real protocol), the same for all
variants. Five variants, each on the same seeds, side by side in ONE process:

* ``before``: ``wmdd_jax.train.train`` per seed, one after another (each its own program);
* ``after``: ``wmdd_jax.train.train_group`` of all seeds with its default (``together="auto"``: on
  one CPU device the seeds run concurrently, each in a thread, through one compiled step: rows with
  ``concurrent_with`` 3, from 4521f81 on; earlier 1-device rows ran them in turn, as ``sequence``
  now does), as ``wmdd_jax.evaluate`` does;
* ``sequence``: ``train_group(..., together="sequence")``: the seeds in turn through one compiled step;
* ``stacked``: ``train_group(..., together="stack")``: states stacked, one vmapped program
  (the default on GPU/TPU and over several devices);
* ``pytorch``: a plain PyTorch loop (the DC/SRe2L way), the students one after another: a ConvNet-3
  with ``GroupNorm(128, 128)``, the teacher converted with ``wmdd_jax.interop.to_torch``, AdamW +
  ``CosineAnnealingLR`` over the total steps (stepped per step), KL ``sum p_t (log p_t - log p_s)``
  averaged over the batch (no T^2). Augmentation on tensors, per batch: one ``affine_grid`` +
  ``grid_sample`` (bilinear) call crops, resizes and flips every image of the batch with its own
  draws (torchvision's area/log-ratio sampling drawn once and clipped, as ``wmdd_jax.data.augment``
  does). Batch order: a fresh permutation per epoch, the last batch wrapped (same steps per
  student as the JAX runs; not the same batches). ``torch.set_num_threads(--torch-threads)``.

How: for each IPC the variants run in turn (``--repeats`` > 1 repeats the round with the order
rotated; rows then keep the fastest wall time and list all). Each row also carries ``cpu_s``, the
process's CPU seconds during that variant (all threads: the work, whatever the machine's speed), and
``steal_pct``, the share of the machine's CPU time that went to other guests of the host meanwhile
(``/proc/stat``; null elsewhere): on a shared VM the cores' speed moves by tens of percent within
minutes, and a ratio of two wall times holds only when their ``steal_pct`` are alike (the fastest
round's; ``cpu_s_all`` and ``steal_pct_all`` list every round's, rows from 8e3447c on). Before each
variant JAX's in-memory caches are cleared, so every variant pays its own compilation as a fresh
``evaluate`` process does; each variant gets a fresh temporary work directory (deleted after), so
nothing is reused. ``wall_s``
covers the training and the test accuracy of all seeds, compilation included (it is part of the
stage's time); the splits and the teacher are loaded once, outside. ``warm_steps_per_s``: steps per
second after the first logging window (which holds the compilation), from the ``steps_per_s`` curve
of the runs' event files (JAX; null when a run has a single window, i.e. <= 50 steps) or timed
after the first tenth of the steps (PyTorch); ``warm_student_steps_per_s`` multiplies by the
students one step advances (3 for ``stacked``) or that step at the same time (3 for a concurrent
``after``). ``train_loop_s``: the training loops alone (JAX: result.json's ``seconds``, step
compilation included; the longest of the seeds' when they overlap; the rest of ``wall_s`` is
initialisation, checkpoints and testing); ``images_per_s``: student images trained per second of
it, all seeds.
For ``stacked``, ``per_device_mib``: XLA's memory analysis (argument + output + temp - alias) of the
stacked step compiled for the same shapes and mesh, per device (``per_device_mib_one_student``: the
same for one unstacked student), and ``max_abs_weight_diff_vs_before``: the largest difference
between a seed's final weights trained alone and trained stacked.

``--dtype bfloat16`` trains the JAX students in bfloat16 (`config.dtype`; parameters, optimizer
state and norm statistics stay float32); their rows carry ``dtype``. On a CPU bfloat16 is emulated:
compare accuracies with the float32 rows, not times.

``--weight-init`` draws the JAX students' fresh weights: ``torch`` (the config's default; PyTorch's
defaults, as the PyTorch variant's layers draw them) or ``kaiming`` (the toolkit's draw before it had
the option). Rows of ``torch`` carry ``weight_init``; rows without it (all rows before 2026-12-03) drew
``kaiming``.

``--compilation-cache warm`` gives the JAX variants JAX's persistent compilation cache (as the
command line has by default, `wmdd_jax.compilation_cache`) in a fresh temporary folder, filled by one
untimed run of each JAX variant before the timed ones: the time of a later ``evaluate`` of the same
shapes (another synthetic set of that IPC, a rerun), which reads its programs from disk instead of
compiling them. The run's rows (PyTorch's too) carry ``compilation_cache: "warm"``. By default (``off``) no persistent cache
is used, even when ``JAX_COMPILATION_CACHE_DIR`` is set: every variant compiles, as a first run does.

``--simulate-devices N`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax
starts; the JAX variants then train on ``make_mesh(config.mesh)`` of N devices (sharing the CPU's
cores: this tests the layout, it is no speed-up). Rows carry ``devices`` (the PyTorch row too, which
ignores it). One JSON line per (ipc, variant) goes to ``--out`` (a rerun with the same benchmark,
ipc, variant, devices, epochs, machine, dtype and compilation cache replaces its row).

Usage (from the repository root):
  python experiments/bench_evaluate.py                                  # IPC 10 and 50, 30 epochs
  python experiments/bench_evaluate.py --epochs-fraction 1              # the real protocol (300 epochs)
  python experiments/bench_evaluate.py --epochs-fraction 0.02 --ipcs 10 # a quick check
  python experiments/bench_evaluate.py --simulate-devices 4 --variants before,after
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("before", "after", "sequence", "stacked", "pytorch")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ipcs", default="10,50", help="comma-separated images per class")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds")
    p.add_argument("--epochs-fraction", type=float, default=0.1,
                   help="fraction of the recipe's epochs (300) every variant trains; 1 = the real protocol")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all variants per IPC (order rotated)")
    p.add_argument("--simulate-devices", type=int, default=None,
                   help="N host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="config.dtype of the JAX students (bfloat16 rows carry dtype; on a CPU bfloat16 "
                        "is emulated: its accuracy says what it changes, its time nothing of an accelerator)")
    p.add_argument("--weight-init", choices=("torch", "kaiming"), default="torch",
                   help="the JAX students' weight_init (the config's default: torch, PyTorch's draws); rows of "
                        "kaiming (the draw before the option) carry no weight_init, as older rows")
    p.add_argument("--teacher", default=os.path.join(ROOT, "experiments", "teachers", "fashion_mnist_convnet3_bn"))
    p.add_argument("--host-allocator", choices=("tuned", "default"), default="tuned",
                   help="'tuned' applies wmdd_jax.host.tune_host_allocator() before jax starts, as "
                        "'python -m wmdd_jax' does (it applies to the whole process, PyTorch too)")
    p.add_argument("--compilation-cache", choices=("off", "warm"), default="off",
                   help="'warm': the JAX variants read their programs from a persistent compilation cache "
                        "filled by an untimed run (a later evaluate of the same shapes); 'off': they compile")
    p.add_argument("--no-memory", action="store_true", help="skip the compiled step's memory analysis")
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU",
                   help="what the rows say of the machine, e.g. whether other jobs shared it")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "bench_evaluate.jsonl"))
    args = p.parse_args(argv)
    args.ipcs = [int(x) for x in args.ipcs.split(",") if x]
    args.seeds = [int(x) for x in args.seeds.split(",") if x]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad:
        p.error(f"unknown variants {bad}; use {', '.join(VARIANTS)}")
    return args


ARGS = parse_args(sys.argv[1:])
if ARGS.simulate_devices:  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.simulate_devices}").strip()
sys.path.insert(0, ROOT)
from wmdd_jax.host import tune_host_allocator  # noqa: E402  (imports no jax)

if ARGS.host_allocator == "tuned":
    tune_host_allocator()

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from wmdd_jax import placement, predict, results  # noqa: E402
from wmdd_jax.data import ArraySource, load_split, random_subset  # noqa: E402
from wmdd_jax.fingerprint import fingerprint  # noqa: E402
from wmdd_jax.interop.checkpoint import jax_to_numpy  # noqa: E402
from wmdd_jax.interop.state_dict import to_torch  # noqa: E402
from wmdd_jax.metric_writers import read_scalars  # noqa: E402
from wmdd_jax.optim import make_optimizer  # noqa: E402
from wmdd_jax.sharding import make_mesh  # noqa: E402
from wmdd_jax.teacher import identity, load_teacher, model_from_spec, precision  # noqa: E402
from wmdd_jax.train import Run, train, train_group  # noqa: E402
from wmdd_jax.train_step import TrainState, batch_indices, batch_plan, init_variables, make_train_step  # noqa: E402


# ---------------------------------------------------------------- setup

def setup():
    config = fashion_mnist.get_config()
    config.teacher.checkpoint = ARGS.teacher
    config.eval.source = "random_real"
    config.dtype = ARGS.dtype
    spec = config.eval.soft.copy_and_resolve_references()
    with spec.unlocked():
        spec.model = "convnet3"
        spec.epochs = max(1, int(round(int(config.eval.soft.epochs) * ARGS.epochs_fraction)))
        spec.weight_init = ARGS.weight_init
    train_source = load_split(config.data, "train")
    test_source = load_split(config.data, "test")
    teacher = load_teacher(config, "", train_source)
    return config, spec, train_source, test_source, teacher


def subset(train_source, ipc: int, seed: int):
    idx, _ = random_subset(train_source, ipc, seed)
    images, labels = train_source.get(idx)
    return idx, ArraySource(images, labels, train_source.num_classes, train_source.mean, train_source.std,
                            name="random_real")


def make_runs(train_source, ipc, seeds, teacher_id, root):
    runs = []
    for seed in seeds:
        idx, data = subset(train_source, ipc, seed)
        inputs = {"images": fingerprint({"indices": idx}), "teacher": teacher_id}
        runs.append(Run(data, os.path.join(root, f"seed{seed}"), seed, None, None, inputs,
                        desc=f"convnet3 soft seed {seed}"))
    return runs


def clear_caches():
    """As a fresh process: every variant compiles its own programs."""
    jax.clear_caches()
    predict._predict_fn.cache_clear()


# ---------------------------------------------------------------- JAX variants

def warm_rate(workdir: str) -> float | None:
    """Steps/s after the first logging window, from the run's ``steps_per_s`` curve."""
    curve = sorted(read_scalars(workdir).get("steps_per_s", []))
    if len(curve) < 2:
        return None
    steps = [b[0] - a[0] for a, b in zip(curve, curve[1:])]
    seconds = sum(s / v for s, (_, v) in zip(steps, curve[1:]))
    return sum(steps) / seconds if seconds > 0 else None


def run_jax(variant, ctx, ipc):
    config, spec, train_source, test_source, teacher, mesh = ctx
    model = model_from_spec(spec, train_source.num_classes, config.conv_impl)
    root = tempfile.mkdtemp(prefix=f"bench_evaluate_{variant}_ipc{ipc}_")
    try:
        t0 = time.perf_counter()
        runs = make_runs(train_source, ipc, ARGS.seeds, identity(teacher), root)
        common = dict(test_source=test_source, teacher=teacher, verbose=False, config_key="eval.soft", mesh=mesh,
                      precision=precision(config))
        if variant == "before":
            trained = [train(model, spec, r.source, r.workdir, seed=r.seed, inputs=r.inputs, desc=r.desc, **common)
                       for r in runs]
        else:
            together = {"stacked": "stack", "sequence": "sequence"}.get(variant, "auto")
            trained = train_group(model, spec, runs, together=together, **common)
        wall = time.perf_counter() - t0
        done = [json.load(open(os.path.join(r.workdir, "result.json"))) for r in runs]
        rates = [warm_rate(r.workdir) for r in runs]
        steps, batch = done[0]["steps"], batch_plan(len(runs[0].source), spec)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    warm = float(np.mean(rates)) if all(r is not None for r in rates) else None
    per_step = done[0].get("trained_with", 1)  # students one step advances
    # result.json's seconds: the training loop (step compilation included), shared by runs trained
    # together (stacked) and overlapping for runs trained concurrently (in threads)
    overlap = per_step > 1 or done[0].get("concurrent_with", 1) > 1
    loop = max(d["seconds"] for d in done) if overlap else sum(d["seconds"] for d in done)
    return dict(wall_s=wall, accuracies=[t.test_accuracy for t in trained],
                variables=[jax.tree.map(np.asarray, t.variables) for t in trained], train_loop_s=loop,
                images_per_s=len(runs) * steps * batch / loop,
                trained_with=done[0].get("trained_with"), concurrent_with=done[0].get("concurrent_with", 1),
                warm_steps_per_s=warm,
                # concurrent runs step at the same time: the students' rates add up
                warm_student_steps_per_s=None if warm is None else warm * (len(runs) if overlap and per_step == 1
                                                                            else per_step))


def step_memory(ctx, ipc, num_runs):
    """XLA's per-device memory figures of the training step (stacked when num_runs > 1), as train_group builds it."""
    config, spec, train_source, test_source, teacher, mesh = ctx
    model = model_from_spec(spec, train_source.num_classes, config.conv_impl)
    runs = make_runs(train_source, ipc, ARGS.seeds[:num_runs], identity(teacher), "/nonexistent")
    runs = [r._replace(data_seed=r.seed) for r in runs]
    n = len(runs[0].source)
    batch_size, total_steps = batch_plan(n, spec)
    tx = make_optimizer(spec, total_steps)
    stacked = num_runs > 1
    layout = placement.BatchLayout(mesh, num_runs if stacked else None, batch_size)
    mean, std = np.asarray(train_source.mean, np.float32), np.asarray(train_source.std, np.float32)
    step_fn = make_train_step(model, tx, spec, mean, std, teacher, stacked=stacked,
                              out_shardings=None if layout.mode == "single" else (layout.state_sharding,
                                                                                  layout.replicated),
                              precision=precision(config))
    states = []
    for r in runs:
        v = init_variables(model, jax.random.key(r.seed), r.source.image_shape)
        states.append(TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=v["params"],
                                 batch_stats=v.get("batch_stats", {}), opt_state=tx.init(v["params"])))
    state = layout.put_state(placement.stack(states) if stacked else states[0])
    teacher_vars = layout.put_replicated(teacher.variables)
    weights = [np.ones(n, np.float32) for _ in runs]
    seeds = np.asarray([r.data_seed for r in runs], np.int32)
    seeds = layout.put_runs(seeds if stacked else seeds[0])
    images, labels, w = layout.load(runs, weights, lambda run: batch_indices(n, batch_size, 0, run.data_seed))
    mem = step_fn.lower(state, images, labels, w, seeds, teacher_vars, None).compile().memory_analysis()
    if mem is None:
        return None, layout
    b = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    return b, layout


# ---------------------------------------------------------------- PyTorch variant

class TorchConvNet3(tnn.Module):
    """DC/DM's ConvNet-3: 3 x [3x3 conv, norm, ReLU, 2x2 avg pool], a Linear on the flattened NCHW map."""

    def __init__(self, channels, num_classes, image_size, width=128, norm="instance", first_padding=-1):
        super().__init__()
        layers, cin, side = [], channels, image_size
        for d in range(3):
            pad = 1 if d else (first_padding if first_padding >= 0 else (3 if channels == 1 else 1))
            layers.append(tnn.Conv2d(cin, width, 3, padding=pad))
            layers.append(tnn.GroupNorm(width, width, affine=True) if norm == "instance" else tnn.BatchNorm2d(width))
            layers += [tnn.ReLU(inplace=True), tnn.AvgPool2d(2, 2)]
            cin, side = width, (side + 2 * pad - 2) // 2
        self.features = tnn.Sequential(*layers)
        self.classifier = tnn.Linear(width * side * side, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def torch_teacher(teacher, image_shape, num_classes):
    m = teacher.model
    net = TorchConvNet3(image_shape[-1], num_classes, image_shape[0], m.width, m.norm, m.first_padding)
    state = to_torch(jax_to_numpy(teacher.variables), m, image_shape)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return net.eval()


def nchw(images, mean, std):
    x = (np.asarray(images, np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def augment(x, gen, scale, flip, ratio=(3 / 4, 4 / 3)):
    """Random-resized crop (+ flip) of every image of the batch, each its own box: one grid_sample."""
    n, _, h, w = x.shape
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=gen))
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=gen))
    bw = torch.sqrt(area * r).clamp(1.0, w)
    bh = torch.sqrt(area / r).clamp(1.0, h)
    top = torch.rand(n, generator=gen) * (h - bh)
    left = torch.rand(n, generator=gen) * (w - bw)
    sx, sy = bw / w, bh / h
    if flip:
        sx = sx * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([sx, zero, 2 * (left + bw / 2) / w - 1], 1),
                         torch.stack([zero, sy, 2 * (top + bh / 2) / h - 1], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def kl(student_logits, teacher_logits, temperature):
    t = F.log_softmax(teacher_logits / temperature, -1)
    s = F.log_softmax(student_logits / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def torch_accuracy(net, x, labels, batch=500):
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((net(x[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def run_pytorch(ctx, ipc, test_x, test_y, t_teacher):
    config, spec, train_source, test_source, teacher, mesh = ctx
    a = spec.augment
    accuracies, rates, loop, t0 = [], [], 0.0, time.perf_counter()
    for seed in ARGS.seeds:
        _, data = subset(train_source, ipc, seed)
        x = nchw(data.images, data.mean, data.std)
        n = len(x)
        batch_size, total = batch_plan(n, spec)
        per_epoch = math.ceil(n / batch_size)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = TorchConvNet3(x.shape[1], data.num_classes, x.shape[2], int(spec.width), spec.norm,
                            int(spec.first_padding))
        opt = torch.optim.AdamW(net.parameters(), lr=float(spec.lr), weight_decay=float(spec.weight_decay))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        rng = np.random.default_rng(seed)
        net.train()
        warm_from, warm_t, t_loop = max(1, total // 10), None, time.perf_counter()
        for step in range(total):
            if step == warm_from:
                warm_t = time.perf_counter()
            i = step % per_epoch
            if i == 0:
                order = torch.from_numpy(np.resize(rng.permutation(n), per_epoch * batch_size))
            xb = augment(x[order[i * batch_size:(i + 1) * batch_size]], gen, tuple(a.crop_scale), bool(a.flip))
            with torch.no_grad():
                target = t_teacher(xb)
            loss = kl(net(xb), target, float(spec.temperature))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if warm_t is not None and total > warm_from:
            rates.append((total - warm_from) / (time.perf_counter() - warm_t))
        loop += time.perf_counter() - t_loop
        if not math.isfinite(float(loss.detach())):
            print(f"pytorch seed {seed}: the loss is {float(loss.detach())}", file=sys.stderr)
        accuracies.append(torch_accuracy(net, test_x, test_y))
    wall = time.perf_counter() - t0
    warm = float(np.mean(rates)) if len(rates) == len(ARGS.seeds) else None
    images = len(ARGS.seeds) * total * batch_size
    return dict(wall_s=wall, accuracies=accuracies, warm_steps_per_s=warm, warm_student_steps_per_s=warm,
                train_loop_s=loop, images_per_s=images / loop)


# ---------------------------------------------------------------- main

def main():
    torch.set_num_threads(ARGS.torch_threads)
    config, spec, train_source, test_source, teacher = setup()
    cache_dir = None
    if ARGS.compilation_cache == "warm":
        cache_dir = tempfile.mkdtemp(prefix="bench_evaluate_xla_cache_")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_dir", cache_dir)  # off: not even $JAX_COMPILATION_CACHE_DIR's
    mesh = make_mesh(config.mesh)
    devices = ARGS.simulate_devices or 1
    if mesh.size != devices:
        print(f"note: the mesh has {mesh.size} devices (jax sees {jax.device_count()})", file=sys.stderr)
    ctx = (config, spec, train_source, test_source, teacher, mesh)
    test_x = test_y = t_teacher = None
    if "pytorch" in ARGS.variants:
        test_images, test_labels = test_source.get(np.arange(len(test_source)))
        test_x, test_y = nchw(test_images, test_source.mean, test_source.std), torch.from_numpy(
            np.asarray(test_labels, np.int64))
        t_teacher = torch_teacher(teacher, tuple(train_source.image_shape), train_source.num_classes)
        # The converted teacher computes what ours does (logits on 200 test images).
        probe = test_images[:200]
        ours = np.asarray(teacher.model.apply(teacher.variables, (probe - np.float32(train_source.mean))
                                              / np.float32(train_source.std), train=False))
        with torch.no_grad():
            theirs = t_teacher(test_x[:200]).numpy()
        print(f"teacher in PyTorch: max |logit difference| {np.abs(ours - theirs).max():.2e} on 200 test images")

    command = "python experiments/bench_evaluate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    commit = getattr(results, "code_commit", None)
    table = []
    for ipc in ARGS.ipcs:
        n = ipc * train_source.num_classes
        steps = batch_plan(n, spec)[1]
        outcome = {v: [] for v in ARGS.variants}
        if cache_dir is not None:  # fill the cache: one untimed run of each JAX variant
            for variant in ARGS.variants:
                if variant != "pytorch":
                    clear_caches()
                    print(f"ipc {ipc}: {variant}, untimed, to fill the compilation cache...", flush=True)
                    run_jax(variant, ctx, ipc)
        for rep in range(ARGS.repeats):
            k = rep % len(ARGS.variants)
            for variant in ARGS.variants[k:] + ARGS.variants[:k]:
                clear_caches()
                print(f"ipc {ipc}: {variant} (round {rep + 1}/{ARGS.repeats}, {len(ARGS.seeds)} seeds x {steps} "
                      f"steps)...", flush=True)
                start = host_sample()
                out = run_pytorch(ctx, ipc, test_x, test_y, t_teacher) if variant == "pytorch" else \
                    run_jax(variant, ctx, ipc)
                out.update(host_share(start, host_sample()))
                out["load_avg_1m"] = round(os.getloadavg()[0], 2)
                outcome[variant].append(out)
                steal = "" if out["steal_pct"] is None else f", {out['steal_pct']}% of the machine stolen"
                print(f"  {out['wall_s']:.1f} s ({out['cpu_s']:.0f} CPU s{steal}), accuracies "
                      f"{[round(x, 2) for x in out['accuracies']]}", flush=True)
        best = {v: min(outs, key=lambda o: o["wall_s"]) for v, outs in outcome.items()}
        memory, one, layout = None, None, None
        if "stacked" in ARGS.variants and not ARGS.no_memory:
            clear_caches()
            memory, layout = step_memory(ctx, ipc, len(ARGS.seeds))
            one, _ = step_memory(ctx, ipc, 1)
        pytorch_wall = best["pytorch"]["wall_s"] if "pytorch" in best else None
        for variant in ARGS.variants:
            out = best[variant]
            acc = [round(float(x), 2) for x in out["accuracies"]]
            row = dict(benchmark="evaluate", dataset="fashion_mnist", model="convnet3", label_mode="soft", ipc=ipc,
                       variant=variant, devices=devices, seeds=ARGS.seeds, epochs=int(spec.epochs),
                       steps_per_student=steps, wall_s=round(out["wall_s"], 2),
                       wall_s_all=[round(o["wall_s"], 2) for o in outcome[variant]], accuracies=acc,
                       mean=round(float(np.mean(acc)), 2), std=round(float(np.std(acc)), 2),
                       speedup_vs_pytorch=(round(pytorch_wall / out["wall_s"], 3) if pytorch_wall else None),
                       warm_steps_per_s=_r(out["warm_steps_per_s"]),
                       warm_student_steps_per_s=_r(out["warm_student_steps_per_s"]),
                       train_loop_s=round(out["train_loop_s"], 2), images_per_s=_r(out["images_per_s"]),
                       per_device_mib=None)
            if variant == "stacked":
                if memory is not None:
                    row["per_device_mib"] = _mib(memory)
                    row["per_device_bytes"] = memory
                    row["layout"] = layout.mode
                    row["layout_devices"] = 1 if layout.mode == "single" else int(layout.mesh.size)
                if one is not None:
                    row["per_device_mib_one_student"] = _mib(one)
                stats = jax.devices()[0].memory_stats()  # None on CPU; on an accelerator the process's peak
                if stats and "peak_bytes_in_use" in stats:
                    row["device0_process_peak_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 2)
            if variant in ("after", "sequence", "stacked"):
                row["trained_with"] = out.get("trained_with")
                row["concurrent_with"] = out.get("concurrent_with")
                if "before" in best:
                    diffs = [max(float(np.max(np.abs(x - y))) for x, y in
                                 zip(jax.tree.leaves(a), jax.tree.leaves(b)))
                             for a, b in zip(best["before"]["variables"], out["variables"])]
                    row["max_abs_weight_diff_vs_before"] = float(f"{max(diffs):.3g}")
                    row["accuracy_diff_vs_before"] = [round(float(x) - float(y), 2) for x, y in
                                                      zip(out["accuracies"], best["before"]["accuracies"])]
            if variant == "pytorch":
                row["torch_threads"] = ARGS.torch_threads
                row["augment"] = "per batch: affine_grid + grid_sample (bilinear), per-image boxes and flips"
            else:
                row["conv_impl"] = config.conv_impl
                if ARGS.dtype != "float32":
                    row["dtype"] = ARGS.dtype
                if ARGS.weight_init != "kaiming":
                    row["weight_init"] = ARGS.weight_init
            if cache_dir is not None:  # the whole run's rows, PyTorch's too: their ratios belong together
                row["compilation_cache"] = "warm"
            row.update(machine=ARGS.machine, load_avg_1m=out["load_avg_1m"], cpu_s=out["cpu_s"],
                       steal_pct=out["steal_pct"], cpu_s_all=[o["cpu_s"] for o in outcome[variant]],
                       steal_pct_all=[o["steal_pct"] for o in outcome[variant]], command=command,
                       date=datetime.date.today().isoformat())
            if commit is not None:
                row["code_commit"] = commit()
            results.upsert_jsonl(ARGS.out, row,
                                 keys=("benchmark", "ipc", "variant", "devices", "epochs", "machine", "dtype",
                                       "compilation_cache", "weight_init"))
            table.append(row)

    print()
    print(f"{'ipc':>4} {'variant':<8} {'dev':>3} {'steps':>6} {'wall s':>8} {'vs torch':>8} "
          f"{'warm st/s':>9} {'MiB/dev':>8}  accuracy (per seed)")
    for r in table:
        speed = f"{r['speedup_vs_pytorch']:.2f}x" if r["speedup_vs_pytorch"] else "-"
        warm = f"{r['warm_student_steps_per_s']:.2f}" if r["warm_student_steps_per_s"] else "-"
        mib = f"{r['per_device_mib']:.1f}" if r["per_device_mib"] else "-"
        print(f"{r['ipc']:>4} {r['variant']:<8} {r['devices']:>3} {r['steps_per_student']:>6} {r['wall_s']:>8.1f} "
              f"{speed:>8} {warm:>9} {mib:>8}  {r['mean']:.2f} ± {r['std']:.2f} {r['accuracies']}")
    print(f"\nrows: {ARGS.out}")
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)


def host_sample() -> tuple[float, int | None, int | None]:
    """(this process's CPU seconds, the machine's CPU jiffies in all and stolen) from /proc/stat."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return usage.ru_utime + usage.ru_stime, None, None
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is in user already
    return usage.ru_utime + usage.ru_stime, sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def host_share(start, end) -> dict:
    """What the variant got of the machine between two `host_sample`s: ``cpu_s``, its own CPU seconds
    (threads included: the work done, whatever the machine's speed), and ``steal_pct``, the share of the
    machine's CPU time the hypervisor gave to other guests (a shared VM's hidden load: wall times of
    variants with different shares do not compare)."""
    out = dict(cpu_s=round(end[0] - start[0], 2), steal_pct=None)
    if start[1] is not None and end[1] is not None and end[1] > start[1]:
        out["steal_pct"] = round(100.0 * (end[2] - start[2]) / (end[1] - start[1]), 1)
    return out


def _r(x, digits=3):
    return None if x is None else round(float(x), digits)


def _mib(b):
    return round((b["argument"] + b["output"] + b["temp"] - b["alias"]) / 2**20, 2)


if __name__ == "__main__":
    main()
