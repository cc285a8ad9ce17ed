"""How the synthesis step grows with the number of classes and with the device count.

For each simulated device count (a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=N) and each class count, times the jitted,
class-sharded synthesis step of ``wmdd_jax.distill`` (random ConvNet-3 teacher with batch norm,
random targets) and reads XLA's per-device memory figures of the compiled step (arguments,
outputs, temporaries): the memory one device needs for its share of the classes.

On a CPU host the simulated devices share its cores, so step times across device counts show
overhead, not speed-up; the per-device memory is the figure that carries over to real devices.

    python experiments/bench_scaling.py [--devices 1 2 4 8] [--classes 10 100 1000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "experiments", "results", "bench_scaling.jsonl")


def child(num_classes: list[int], ipc: int, size: int, width: int, repeats: int) -> list[dict]:
    import time
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax
    import numpy as np
    import optax

    from configs import default
    from wmdd_jax import distill, sharding
    from wmdd_jax.models import create_model
    from wmdd_jax.train_step import init_variables

    config = default.get_config()
    mesh = sharding.make_mesh(config.mesh)
    rows = []
    for C in num_classes:
        model = create_model("convnet3", C, norm="batch", width=width)
        variables = sharding.put_replicated(init_variables(model, jax.random.key(0), (size, size, 3)), mesh)
        rng = np.random.default_rng(0)
        C_pad = sharding.num_padded_classes(C, mesh)

        def by_class(shape, scale=1.0, dtype=np.float32):
            return sharding.class_array(mesh, C, lambda k: (rng.standard_normal(shape) * scale).astype(dtype),
                                        shape, dtype)

        moments = jax.eval_shape(lambda v: distill._feature_fn(model)(v, np.zeros((1, size, size, 3), np.float32)),
                                 variables)[1]
        bn_mean = {layer: by_class((m.shape[1],)) for layer, (m, _) in moments.items()}
        bn_var = {layer: by_class((m.shape[1],), 0.1) for layer, (m, _) in moments.items()}
        targets = distill.Targets(by_class((ipc, width * (size // 8) ** 2)), bn_mean, bn_var)
        class_ids = sharding.class_array(mesh, C, lambda k: np.int32(k), (), np.int32)
        mask = sharding.class_array(mesh, C, lambda k: np.float32(1), ())
        tx = optax.adam(optax.cosine_decay_schedule(0.25, 1000), b1=0.5, b2=0.9)
        images = by_class((ipc, size, size, 3))

        def fresh(images):
            return distill.SynthesisState(step=jax.numpy.zeros((), jax.numpy.int32), images=images,
                                          opt_state=tx.init(images))

        shardings = sharding.tree_shardings(jax.eval_shape(fresh, images), mesh, C_pad)
        state = jax.jit(fresh, out_shardings=shardings)(images)
        step = distill.make_synthesis_step(model, config.synthesis, np.zeros(3, np.float32), np.ones(3, np.float32),
                                           size, tx, seed=0, state_shardings=shardings)
        t0 = time.perf_counter()
        compiled = step.lower(state, targets, variables, class_ids, mask).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state, parts = compiled(state, targets, variables, class_ids, mask)
        jax.block_until_ready(state)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, parts = compiled(state, targets, variables, class_ids, mask)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        per_device = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
        rows.append(dict(
            benchmark="synthesis_scaling", devices=jax.device_count(), classes=C, padded_classes=C_pad, ipc=ipc,
            images=C * ipc, image_size=size, channels=3, teacher=f"convnet3_bn_w{width}",
            step_s_median=round(float(np.median(times)), 4), step_s_min=round(float(np.min(times)), 4),
            repeats=repeats, compile_s=round(compile_s, 2),
            per_device_bytes=per_device,
            per_device_peak_mib=round((per_device["argument"] + per_device["output"] + per_device["temp"]
                                       - per_device["alias"]) / 2**20, 2),
            loss_finite=bool(all(np.isfinite(float(v)) for v in parts.values()))))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.classes, args.ipc, args.size, args.width, args.repeats)
        return

    from wmdd_jax.results import code_commit
    from wmdd_jax import results

    command = "python experiments/bench_scaling.py " + " ".join(sys.argv[1:])
    commit = code_commit()
    for n in args.devices:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "PYTHONPATH": ROOT}
        out = subprocess.run([sys.executable, __file__, "--child", "--classes", *map(str, args.classes),
                              "--ipc", str(args.ipc), "--size", str(args.size), "--width", str(args.width),
                              "--repeats", str(args.repeats)], env=env, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                row = dict(json.loads(line), command=command, code_commit=commit,
                           date=datetime.date.today().isoformat(),
                           machine=f"{os.cpu_count()}-core CPU, {n} simulated devices sharing it",
                           load_avg_1m=round(os.getloadavg()[0], 2))
                results.upsert_jsonl(OUT, row, keys=("benchmark", "devices", "classes", "ipc", "image_size"))
                print(f"devices={n} classes={row['classes']}: {row['step_s_median']} s/step, "
                      f"{row['per_device_peak_mib']} MiB per device", flush=True)


if __name__ == "__main__":
    main()
