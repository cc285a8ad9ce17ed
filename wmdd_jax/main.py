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
from wmdd_jax.files import WorkdirLock, make_folder

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, arrays, metrics and results go here.")
flags.DEFINE_string("target", None, "plan only: tpu:<topology>[:megacore] (e.g. tpu:v5e:4x4), gpu:<card>:<count> "
                    "(h100, h200, a100) or cpu:<count>.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override fields with --config.a.b=value.",
                                lock_config=True)


def _stages():
    # Imported on use: a bad flag or config key is reported before jax and flax load (seconds).
    from wmdd_jax import distill
    from wmdd_jax.evaluate import evaluate
    from wmdd_jax.interop.export import export
    from wmdd_jax.pipeline import process_zero_only, run_all, run_distill
    from wmdd_jax.relabel import relabel
    from wmdd_jax.teacher import pretrain

    return {"pretrain": pretrain, "statistics": distill.statistics, "barycenter": distill.barycenter,
            "recover": distill.recover, "relabel": process_zero_only(relabel),
            "evaluate": evaluate, "all": run_all, "distill": run_distill,
            "export": process_zero_only(export)}


STAGES = ("pretrain", "statistics", "barycenter", "recover", "relabel", "evaluate", "all", "distill", "export", "plan")


def _fail(message: str) -> None:
    print(f"wmdd_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":")[0]
            if not os.path.isfile(path):
                _fail(f"config file {arg.split('=', 1)[1]!r} not found; use one of configs/*.py")
            # Config files import their defaults as the package they sit in (``from configs import
            # default``): make that package importable from any working directory.
            folder = os.path.dirname(os.path.abspath(path))
            if os.path.exists(os.path.join(folder, "__init__.py")) and os.path.dirname(folder) not in sys.path:
                sys.path.insert(0, os.path.dirname(folder))
    # A key given twice: the last value wins, as for any flag (config_flags would join tuples).
    last = {arg.split("=", 1)[0]: i for i, arg in enumerate(argv) if arg.startswith("--config.") and "=" in arg}
    argv = [arg for i, arg in enumerate(argv)
            if not (arg.startswith("--config.") and "=" in arg) or last[arg.split("=", 1)[0]] == i]
    try:
        return FLAGS(argv)
    except flags.Error as e:
        # config_flags wraps the config file's own error (e.g. an unknown variant) in its chain.
        inner = e
        while (inner.__cause__ or inner.__context__) is not None:
            inner = inner.__cause__ or inner.__context__
        head = _first_line(e).split(": Error whilst")[0]
        reason = _first_line(inner)
        _fail(f"{head}{'' if reason in head else ': ' + reason} (see --helpfull)")
    except (KeyError, AttributeError) as e:  # config_flags: an override of a key the config lacks
        error = e.__context__ if isinstance(e.__context__, KeyError) else e
        text = str(error.args[0]) if error.args else str(error)
        key, _, hint = text.partition("\n")
        hint = f" {hint.strip()}" if hint.strip() else ""
        _fail(f"unknown config key {key.strip(chr(39) + chr(34))!r} in a --config.* override: it must name a "
              f"field of the config file (see configs/default.py).{hint}")
    except Exception as e:  # config_flags raises AttributeError/TypeError/ValueError for bad overrides
        _fail(f"bad --config override: {_first_line(e)}")
    return []


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
    try:
        # Here, not at the top: flag errors (in _parse) are reported before jax and flax load.
        from wmdd_jax.compilation_cache import use_compilation_cache
        from wmdd_jax.config_check import check_config
        from wmdd_jax.sharding import initialize_distributed, process_index

        check_config(config)
        make_folder(FLAGS.workdir, "--workdir")
        if argv[1] != "plan":  # a compile-only target's programs cannot be read back from the cache
            use_compilation_cache(config.compilation_cache)  # before anything compiles

        initialize_distributed(config)  # before any computation; a no-op unless asked for
        # One lock per process of a run: the processes of one jax.distributed run share the folder.
        name = ".lock" if process_index() == 0 else f".lock.process{process_index()}"
        with WorkdirLock(FLAGS.workdir, name):
            if argv[1] == "plan":
                _plan(config, FLAGS.workdir, FLAGS.target)
            else:
                _stages()[argv[1]](config, FLAGS.workdir)
    except UserError as e:
        _fail(str(e))
    except OSError as e:  # the file system said no (permissions, a full disk, a missing file)
        if e.errno is None:
            raise
        where = f" {e.filename!r}" if e.filename else ""
        _fail(f"cannot access{where}: {e.strerror or e} (check the path and its permissions, or pass another "
              f"--workdir)")


def _plan(config, workdir: str, target: str | None) -> None:
    """Stage ``plan`` (`wmdd_jax.plan`): exit 3, one line per stage, when a stage does not fit the target."""
    from wmdd_jax import plan

    if not target:
        raise UserError("plan needs --target, e.g. --target=tpu:v5e:4x4, gpu:h100:8 or cpu:1")
    problems = plan.not_fitting(plan.plan(config, workdir, target))
    if problems:
        for line in problems:
            print(f"wmdd_jax: does not fit: {line}", file=sys.stderr)
        sys.exit(3)


def run() -> None:
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
