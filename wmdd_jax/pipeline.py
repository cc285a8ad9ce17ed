"""Stages ``all`` (pretrain -> statistics -> barycenter -> recover -> (relabel) -> evaluate) and
``distill`` (statistics -> barycenter -> recover), and the rule for several processes.

On several processes (``jax.distributed``) every stage but ``relabel`` and ``export`` runs on every
process: the distillation stages each on its own classes, ``pretrain`` and ``evaluate`` data
parallel (each process loads its share of every batch); ``relabel`` and ``export`` run on
process 0 alone.
"""

from __future__ import annotations

import functools
import os
import time

from wmdd_jax import distill, files
from wmdd_jax.evaluate import evaluate
from wmdd_jax.relabel import relabel
from wmdd_jax.sharding import process_index
from wmdd_jax.teacher import pretrain


def process_zero_only(stage):
    """``stage`` on process 0; the other processes skip it."""
    @functools.wraps(stage)
    def run(config, workdir):
        if process_index() == 0:
            return stage(config, workdir)
        return None
    return run


def run_distill(config, workdir):
    """statistics -> barycenter -> recover (the stages every host runs on its classes)."""
    return _run(config, workdir, [("statistics", distill.statistics), ("barycenter", distill.barycenter),
                                  ("recover", distill.recover)])


def run_all(config, workdir):
    """Every stage in order; each skips itself when its outputs exist. Wall times -> timings.json."""
    stages = [("pretrain", pretrain), ("statistics", distill.statistics),
              ("barycenter", distill.barycenter), ("recover", distill.recover)]
    if "soft" in config.eval.label_modes and config.eval.soft.relabel == "stored":
        stages.append(("relabel", process_zero_only(relabel)))
    stages.append(("evaluate", evaluate))
    return _run(config, workdir, stages)


def _run(config, workdir, stages):
    path = os.path.join(workdir, "timings.json")
    timings = files.read_json(path, default={}, what="stage times")
    for name, stage in stages:
        t0 = time.time()
        stage(config, workdir)
        # The first completion is recorded; a rerun that finds the outputs skips and keeps it.
        timings.setdefault(name, round(time.time() - t0, 1))
        if process_index() == 0:
            files.write_json(path, timings, indent=1)

