"""Orbax checkpoints of any pytree (train states, synthetic images), with errors for people."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from wmdd_jax import files
from wmdd_jax.errors import UserError


# Orbax's calls are not safe from several threads at once: the ids of its save signals get mixed and a
# save times out (seen with `wmdd_jax.train.train_group`'s concurrent runs). Every call below holds this
# lock for its synchronous part; the writes themselves still overlap in orbax's background threads.
_ORBAX = threading.RLock()


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A manager over ``directory`` (made absolute, created when missing).

    Its cross-process barriers carry a key of their own (from the folder): the runs trained together
    (`wmdd_jax.train.train_group`) save through one manager each, concurrently, and on several
    processes managers that share barrier names wait on each other's saves (a hang, seen on 2 processes).
    """
    directory = os.path.abspath(directory)
    key = hashlib.sha1(directory.encode()).hexdigest()[:12]
    with _ORBAX:
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"ckpt{key}")))


def save(mngr: ocp.CheckpointManager, step: int, tree: Any) -> None:
    with _ORBAX:
        mngr.save(step, args=ocp.args.StandardSave(tree), force=True)


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits until ``mngr``'s saves in flight are written."""
    with _ORBAX:
        mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
    """Restores ``step`` (default: the latest) into the structure of ``target``.

    Returns ``target`` unchanged when there is no checkpoint yet.
    """
    wait(mngr)
    step = mngr.latest_step() if step is None else step
    if step is None:
        return target
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        with _ORBAX:
            return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for unreadable files
        raise UserError(f"checkpoint {mngr.directory}/{step} cannot be restored ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); delete that folder to start the stage over") from e


def write_npz(path: str, **arrays) -> None:
    """``np.savez`` made atomic: a reader (or a resumed run) never sees half a file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.write_atomic(path, buffer.getvalue())


def read_npz(path: str, stage: str) -> dict:
    """Every array of the ``.npz`` at ``path``, read now; a damaged or cut-off file is a `UserError`
    that says to rerun ``stage`` (the stage that writes it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]}); it is damaged or was cut "
                        f"off: delete it and rerun the '{stage}' stage") from e


def save_tree(path: str, tree: Any) -> None:
    """Writes one pytree (e.g. final model variables) to ``path``, replacing what is there."""
    with _ORBAX, ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), tree, force=True)


def load_tree(path: str, target: Any) -> Any:
    """Reads a pytree written by `save_tree` into the structure of ``target``."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        with _ORBAX, ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(os.path.abspath(path), abstract)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be restored ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); delete it and rerun the stage that writes it") from e


def check_recipe(folder: str, recipe: dict, what: str) -> None:
    """Records ``recipe`` in ``folder/recipe.json``; refuses another recipe once ``folder`` holds outputs.

    A stage that resumes or reuses its outputs calls this first, so that rerunning it with changed
    settings in the same work directory is an error rather than a quiet reuse of the old results.
    While the folder holds nothing but the recipe (a run that failed before writing anything), the
    new recipe replaces it. ``what`` names the outputs in the message (e.g. "a training run").
    """
    recipe = json.loads(json.dumps(recipe, default=str))  # tuples -> lists, as when read back
    path = os.path.join(folder, "recipe.json")
    outputs = any(name != "recipe.json" and not name.endswith(".tmp")
                  for _, _, names in os.walk(folder) for name in names)
    if not os.path.exists(path) or not outputs:
        files.write_json(path, recipe, indent=1, sort_keys=True)  # atomic: processes may write it together
        return
    saved = files.read_json(path)
    if not isinstance(saved, dict):
        raise UserError(f"{path} is unreadable, so what {folder} holds is unknown: delete {folder} to redo it")
    changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} there, {recipe.get(k)!r} now" for k in changed)
        raise UserError(f"{folder} holds {what} of another recipe ({detail}). Use another --workdir for the "
                        f"new settings, or delete {folder} to redo it.")
