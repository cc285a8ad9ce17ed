"""Small files that survive a kill: atomic writes, JSON lines read back after a partial write,
and the lock that keeps two runs out of one work directory.

Every file a stage writes goes through a temporary file in the same folder and ``os.replace``,
so a reader (or a rerun after ``kill -9``) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import warnings
from typing import Any, Iterator

from wmdd_jax.errors import UserError


def make_folder(path: str, flag: str, otherwise: str = "") -> None:
    """Creates the folder ``path`` (with its parents) that the user gave as ``flag``, or raises one
    `UserError` naming ``flag`` when it is a file, cannot be created or cannot be written;
    ``otherwise`` ends each message (e.g. another way out)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}={path} is a file, not a folder: pass a folder (it is created if missing){otherwise}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {flag}={path} ({e.strerror or e}): pass a folder you can write to"
                        f"{otherwise}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag}={path} is not writable: pass a folder you can write to{otherwise}")


def write_atomic(path: str, data: str | bytes) -> None:
    """Replaces ``path`` by ``data`` in one step (a temporary file, fsync, ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any, **dump_options) -> None:
    """``json.dump`` made atomic."""
    write_atomic(path, json.dumps(obj, **dump_options))


def read_json(path: str, default: Any = None, what: str = "") -> Any:
    """The JSON in ``path``; ``default`` when it is missing or unreadable (e.g. cut off by a kill).

    With ``what`` (a description such as "a finished run's result"), an unreadable file warns
    that it is ignored, so the caller recomputes it.
    """
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if what:
            warnings.warn(f"{path} ({what}) is unreadable ({e}); ignoring it", stacklevel=2)
        return default


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file; a cut-off last line (a writer killed mid-append) is dropped.

    A bad line elsewhere is corruption nothing should paper over: a ``UserError`` names it.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if any(rest.strip() for rest in lines[number:]):
                raise UserError(f"{path}:{number} is not a JSON line ({e}); repair or delete that line") from e
            warnings.warn(f"{path}: dropped a cut-off last line ({len(line)} bytes)", stacklevel=2)
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str, row: dict) -> None:
    """Appends one row; a cut-off last line left by a killed writer is removed first."""
    with locked(path):
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                complete = f.read(1) == b"\n"
            if not complete:
                write_jsonl(path, read_jsonl(path))
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive ``fcntl`` lock for a short read-modify-write of ``path``, waited for.

    The lock is on ``path``'s folder, not the file: the file is swapped by ``os.replace``, and a
    lock file beside it would litter results folders.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class WorkdirLock:
    """Keeps a second run out of a work directory while one runs in it.

    ``acquire`` takes a non-blocking ``fcntl`` lock on ``workdir/.lock`` and writes the holder's
    pid and host into it; the kernel drops the lock when the process exits, however it exits
    (``kill -9`` too), so a lock file left by a dead process is simply taken over. A run that
    finds the lock held fails at once with a message naming the process that holds it.

    Several processes of one ``jax.distributed`` run share the work directory: ``name`` tells
    their locks apart (``.lock`` for process 0, ``.lock.process1`` ...).
    """

    def __init__(self, workdir: str, name: str = ".lock"):
        self.path = os.path.join(workdir, name)
        self._file = None

    def acquire(self) -> "WorkdirLock":
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{os.path.dirname(self.path)} is in use by {holder}: wait for that run to end "
                            f"(or stop it), or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
