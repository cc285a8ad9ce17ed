"""Results as JSON lines: one row per measured result (its fields: docs/results.md, "What a row holds")."""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys

import numpy as np

from wmdd_jax import files

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = sys.argv[:]
    if argv and argv[0].endswith(("__main__.py", "wmdd_jax")):
        argv = ["python", "-m", "wmdd_jax", *argv[1:]]
    elif argv:
        argv = ["python", *argv]
    return " ".join(shlex.quote(a) for a in argv)


def summary_row(*, dataset: str, method: str, model: str, ipc: int | None, label_mode: str | None,
                values: list[float], metric: str = "test_accuracy", **extra) -> dict:
    """Mean, std (population, as numpy and the DD literature) and n_seeds of per-seed values."""
    row = {"dataset": dataset, "method": method, "model": model, "ipc": ipc, "label_mode": label_mode,
           "metric": metric, "mean": round(float(np.mean(values)), 2), "std": round(float(np.std(values)), 2),
           "n_seeds": len(values), "values": [round(float(v), 2) for v in values]}
    row.update(extra)
    row.setdefault("command", command_line())
    row.setdefault("date", datetime.date.today().isoformat())
    return row


def code_commit() -> str:
    """The commit of the code that runs (``git rev-parse HEAD``), with " + local changes" when tracked
    files other than the results differ from it; "unknown" outside a git checkout."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)experiments/results")
    return head + (" + local changes" if changed else "")


# Re-exported: the experiments read and append results through this module.
append_jsonl, read_jsonl = files.append_jsonl, files.read_jsonl


KEY_FIELDS = ("dataset", "method", "model", "ipc", "label_mode", "metric")


def upsert_jsonl(path: str, row: dict, keys: tuple[str, ...] = KEY_FIELDS) -> None:
    """Writes ``row`` into ``path``, replacing an earlier row with the same key fields.

    The file is rewritten atomically under a lock (`wmdd_jax.files`): a kill mid-write leaves the
    old rows, and two writers at once each keep the other's row.
    """
    with files.locked(path):
        rows = [r for r in read_jsonl(path) if any(r.get(k) != row.get(k) for k in keys)]
        files.write_jsonl(path, rows + [row])
