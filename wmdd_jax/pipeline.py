"""Stage ``all``: pretrain -> statistics -> barycenter -> recover -> (relabel) -> evaluate."""

from __future__ import annotations

import json
import os
import time

from wmdd_jax import distill
from wmdd_jax.evaluate import evaluate
from wmdd_jax.relabel import relabel
from wmdd_jax.teacher import pretrain


def run_all(config, workdir):
    """Every stage in order; each skips itself when its outputs exist. Wall times -> timings.json."""
    stages = [("pretrain", pretrain), ("statistics", distill.statistics), ("barycenter", distill.barycenter),
              ("recover", distill.recover)]
    if "soft" in config.eval.label_modes and config.eval.soft.relabel == "stored":
        stages.append(("relabel", relabel))
    stages.append(("evaluate", evaluate))
    path = os.path.join(workdir, "timings.json")
    timings = {}
    if os.path.exists(path):
        with open(path) as f:
            timings = json.load(f)
    for name, stage in stages:
        t0 = time.time()
        stage(config, workdir)
        # The first completion is recorded; a rerun that finds the outputs skips and keeps it.
        timings.setdefault(name, round(time.time() - t0, 1))
        with open(path, "w") as f:
            json.dump(timings, f, indent=1)

