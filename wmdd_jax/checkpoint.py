"""Orbax checkpoints of any pytree (train states, synthetic images), with errors for people."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from wmdd_jax.errors import UserError


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A manager over ``directory`` (made absolute, created when missing)."""
    return ocp.CheckpointManager(os.path.abspath(directory),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, tree: Any) -> None:
    mngr.save(step, args=ocp.args.StandardSave(tree), force=True)


def restore(mngr: ocp.CheckpointManager, target: Any, step: int | None = None) -> Any:
    """Restores ``step`` (default: the latest) into the structure of ``target``.

    Returns ``target`` unchanged when there is no checkpoint yet.
    """
    mngr.wait_until_finished()
    step = mngr.latest_step() if step is None else step
    if step is None:
        return target
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for unreadable files
        raise UserError(f"checkpoint {mngr.directory}/{step} cannot be restored ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); delete that folder to start the stage over") from e


def write_npz(path: str, **arrays) -> None:
    """``np.savez`` made atomic: a reader (or a resumed run) never sees half a file."""
    import numpy as np

    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_tree(path: str, tree: Any) -> None:
    """Writes one pytree (e.g. final model variables) to ``path``, replacing what is there."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), tree, force=True)


def load_tree(path: str, target: Any) -> Any:
    """Reads a pytree written by `save_tree` into the structure of ``target``."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(os.path.abspath(path), abstract)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be restored ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); delete it and rerun the stage that writes it") from e
