"""Command line: ``python -m wmdd_jax <stage> --config=configs/X.py --workdir=DIR [--config.key=value ...]``.

Parses flags and dispatches to one stage function; it holds no logic of its own.
"""

from __future__ import annotations

import os
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from wmdd_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, arrays, metrics and results go here.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override fields with --config.a.b=value.",
                                lock_config=True)


def _stages():
    from wmdd_jax import distill
    from wmdd_jax.evaluate import evaluate
    from wmdd_jax.interop.export import export
    from wmdd_jax.pipeline import pretrain_stage, process_zero_only, run_all, run_distill
    from wmdd_jax.relabel import relabel

    return {"pretrain": pretrain_stage, "statistics": distill.statistics, "barycenter": distill.barycenter,
            "recover": distill.recover, "relabel": process_zero_only(relabel),
            "evaluate": process_zero_only(evaluate), "all": run_all, "distill": run_distill,
            "export": process_zero_only(export)}


STAGES = ("pretrain", "statistics", "barycenter", "recover", "relabel", "evaluate", "all", "distill", "export")


def _fail(message: str) -> None:
    print(f"wmdd_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
    for arg in argv:
        if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":")[0]):
            _fail(f"config file {arg.split('=', 1)[1]!r} not found; use one of configs/*.py")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}".splitlines()[0] + " (see --helpfull)")
    except (KeyError, AttributeError) as e:  # config_flags: an override of a key the config lacks
        key = str(e.__context__ or e).strip("'\"")
        _fail(f"unknown config key {key!r} in a --config.* override: it must name a field of the config "
              f"file (see configs/default.py)")
    except Exception as e:  # config_flags raises AttributeError/TypeError/ValueError for bad overrides
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _fail(f"bad --config override: {message}")
    return []


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in STAGES:
        _fail(f"give exactly one stage, one of {', '.join(STAGES)}; got {' '.join(argv[1:]) or 'none'}")
    config = FLAGS.config
    if config is None:
        _fail("--config is required, e.g. --config=configs/fashion_mnist.py")
    if not FLAGS.workdir:
        _fail("--workdir is required: a folder for this run's checkpoints and results")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")
    logging.set_verbosity(logging.WARNING)  # absl INFO (backend probing, orbax) would bury our output
    os.makedirs(FLAGS.workdir, exist_ok=True)
    try:
        from wmdd_jax.sharding import initialize_distributed

        initialize_distributed(config)  # before any computation; a no-op unless asked for
        _stages()[argv[1]](config, FLAGS.workdir)
    except UserError as e:
        _fail(str(e))


def run() -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
