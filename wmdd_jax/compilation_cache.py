"""JAX's persistent compilation cache, on by default: a program compiled once is read back later.

Every stage compiles its programs when it starts (a ConvNet-3 evaluation: the training step 3-4 s,
the initialisation and the test predictions about 1 s each, on a 2-core CPU), and PyTorch, which the
stages are compared with, compiles nothing. The programs depend on shapes and settings only (the
images, teacher and parameters are their arguments), so every later process of the same shapes
(another synthetic set of the same IPC, a resumed run, the next seed grid) reads them from disk in
milliseconds instead. `experiments/bench_evaluate.py --compilation-cache warm` measures the gain.

``config.compilation_cache``:
  dir: ``auto`` = ``$JAX_COMPILATION_CACHE_DIR`` when set (then JAX's own environment settings
    apply as they are), else ``$XDG_CACHE_HOME/wmdd_jax/xla`` (``~/.cache/wmdd_jax/xla``);
    ``""`` = off; or a folder.
  min_compile_secs: programs that compile faster are not stored.
  max_size_mb: beyond this JAX evicts the least recently used entries (-1: no bound).
"""

from __future__ import annotations

import os

from wmdd_jax.files import make_folder


def cache_dir(section) -> str | None:
    """The folder ``section`` (``config.compilation_cache``) names, or None when the cache is off."""
    where = str(section.dir)
    if where == "auto":
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return os.environ["JAX_COMPILATION_CACHE_DIR"]
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "wmdd_jax", "xla")
    return os.path.expanduser(where) or None


def use_compilation_cache(section) -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir` (call before anything compiles).

    Returns the folder, or None when off. A folder that cannot be created or written is a
    `UserError` that names the key (`wmdd_jax.files.make_folder`): a cache JAX cannot write would
    only warn on every compile.
    """
    import jax

    where = cache_dir(section)
    if where is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    make_folder(where, "--config.compilation_cache.dir", ", or '' to compile without a cache")
    jax.config.update("jax_compilation_cache_dir", where)
    if str(section.dir) != "auto" or not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(section.min_compile_secs))
        max_size = int(section.max_size_mb)
        jax.config.update("jax_compilation_cache_max_size", max_size * 2**20 if max_size >= 0 else -1)
    return where
