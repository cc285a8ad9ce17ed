"""`plan` on the pod targets, and its CPU estimate against the measured step on this CPU.

``--targets``: runs ``python -m wmdd_jax plan`` for each (config, IPC, target) and appends one row per
stage to ``--out`` (``experiments/results/plan.jsonl``) as soon as that plan is done: per-device memory,
fits, FLOPs and bytes per step, steps, the roofline estimate. These are compiled-program estimates, not
measured times on the target. A (config, IPC, target) already in ``--out`` is skipped, so rerunning the
command resumes a grid.

``--cpu-check``: compiles the ``recover`` and ``evaluate`` programs of ``--config`` for ``cpu:1`` (the
same programs `plan` estimates), runs each ``--repeats`` times on random inputs of their real shapes,
and writes the median measured step beside the estimate (``measured_over_estimate``).

    python experiments/plan_targets.py --targets tpu:v5e:4x4,tpu:v4:2x2x2 --ipcs 10,50
    python experiments/plan_targets.py --cpu-check --config configs/fashion_mnist.py --ipcs 10,50
    # GPU targets need the cuda extra (a 5.5 GB install): --python names that environment's python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from wmdd_jax.host import skip_absent_tpu, tune_host_allocator  # noqa: E402

OUT = os.path.join(ROOT, "experiments", "results", "plan.jsonl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/imagenet1k.py")
    p.add_argument("--ipcs", default="10,50")
    p.add_argument("--targets", default="", help="comma-separated plan targets")
    p.add_argument("--cpu-check", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--python", default=sys.executable, help="the python whose jax compiles (GPU: the cuda extra)")
    p.add_argument("--out", default=OUT)
    return p.parse_args(argv)


def _done(path: str) -> set:
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["config"], r["ipc"], r["target"]) for r in map(json.loads, f) if r.get("kind") == "plan"}


def _append(path: str, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plan_targets(args) -> None:
    from wmdd_jax.results import code_commit

    done = _done(args.out)
    for target in filter(None, args.targets.split(",")):
        for ipc in (int(i) for i in args.ipcs.split(",")):
            if (args.config, ipc, target) in done:
                continue
            with tempfile.TemporaryDirectory() as workdir:
                cmd = [args.python, "-m", "wmdd_jax", "plan", f"--config={args.config}", f"--workdir={workdir}",
                       f"--target={target}", f"--config.ipc={ipc}"]
                # Compile-only: no local accelerator is started (libtpu and CUDA still compile).
                env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
                t0 = time.time()
                run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                print(run.stdout, run.stderr[-2000:] if run.returncode not in (0, 3) else "", flush=True)
                path = os.path.join(workdir, "plan.json")
                if not os.path.exists(path):
                    print(f"{target} ipc {ipc}: no plan ({run.returncode})", file=sys.stderr)
                    continue
                with open(path) as f:
                    records = json.load(f)
            shown = " ".join(c if c != workdir else "DIR" for c in cmd[1:]).replace(f"--workdir={workdir}",
                                                                                  "--workdir=DIR")
            rows = [dict(kind="plan", config=args.config, ipc=ipc, exit_code=run.returncode,
                         plan_seconds=round(time.time() - t0, 1), command=f"python {shown}",
                         code_commit=code_commit(), date=datetime.date.today().isoformat(), **r) for r in records]
            _append(args.out, rows)


def _materialize(tree, seed: int = 0):
    """Random arrays of the shapes, dtypes and shardings of ``tree``'s `jax.ShapeDtypeStruct` leaves."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def one(s):
        if s is None:
            return None
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            value = jax.random.split(jax.random.key(seed), s.shape) if s.shape else jax.random.key(seed)
        elif np.issubdtype(s.dtype, np.floating):
            value = rng.uniform(0.0, 1.0, s.shape).astype(s.dtype)
        else:
            value = np.zeros(s.shape, s.dtype)
        return jax.device_put(value, s.sharding)

    return jax.tree.map(one, tree, is_leaf=lambda x: x is None or isinstance(x, jax.ShapeDtypeStruct))


def cpu_check(args) -> None:
    import numpy as np

    from wmdd_jax import plan
    from wmdd_jax.results import code_commit

    sys.path.insert(0, os.path.dirname(os.path.abspath(os.path.join(ROOT, args.config))))
    module = __import__("configs." + os.path.splitext(os.path.basename(args.config))[0], fromlist=["get_config"])
    target = plan.parse_target("cpu:1")
    for ipc in (int(i) for i in args.ipcs.split(",")):
        config = module.get_config()
        config.ipc = ipc
        programs = plan.stage_programs(config, target, plan.Shapes(config))
        entries = [("recover", "recover", programs["recover"])] + [("evaluate", label, p)
                                                                    for label, p in programs["evaluate"]]
        rows = []
        for stage, label, program in entries:
            record = plan._analyse(program, target)
            compiled = program.fn.lower(*program.args).compile()
            inputs = _materialize(program.args)
            times = []
            for i in range(args.repeats + 1):
                t0 = time.perf_counter()
                out = compiled(*inputs)
                jax_block(out)
                times.append(time.perf_counter() - t0)
                inputs = (out[0], *inputs[1:])  # the state was donated: the next step takes the new one
            measured = float(np.median(times[1:]))
            row = dict(kind="cpu_check", config=args.config, ipc=ipc, target="cpu:1", stage=stage, program=label,
                       estimated_step_seconds=record["step_seconds"], measured_step_seconds=round(measured, 4),
                       measured_over_estimate=round(measured / record["step_seconds"], 2),
                       flops_per_step=record["flops_per_step"], bytes_per_step=record["bytes_per_step"],
                       peak_figures=target.peak_source, repeats=args.repeats, layout=record["layout"],
                       command="python experiments/plan_targets.py " + " ".join(sys.argv[1:]),
                       code_commit=code_commit(), date=datetime.date.today().isoformat())
            print(json.dumps(row), flush=True)
            rows.append(row)
        _append(args.out, rows)


def jax_block(tree) -> None:
    import jax

    jax.block_until_ready(tree)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cpu_check:
        skip_absent_tpu()
        tune_host_allocator()
        cpu_check(args)
    if args.targets:
        plan_targets(args)


if __name__ == "__main__":
    main()
