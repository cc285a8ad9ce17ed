"""Files that survive a kill (wmdd_jax/files.py, results.upsert_jsonl) and the work-directory lock."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from wmdd_jax import files, results
from wmdd_jax.errors import UserError


class Killed(BaseException):
    """Stands for SIGKILL arriving while a file is being written."""


def _rows(n):
    return [{"dataset": "d", "method": f"m{i}", "model": "convnet3", "ipc": 1, "label_mode": "hard",
             "metric": "test_accuracy", "mean": float(i)} for i in range(n)]


def test_upsert_killed_mid_write_keeps_every_row(tmp_path, monkeypatch):
    """The rewrite of a results file, cut short half-way, leaves the old file whole (it was rewritten
    in place, and a kill left a prefix of the rows that still parsed)."""
    path = str(tmp_path / "rows.jsonl")
    rows = _rows(1000)
    files.write_jsonl(path, rows)
    real_dumps, calls = json.dumps, [0]

    def dumps_then_killed(obj, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 500:
            raise Killed()
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dumps_then_killed)
    with pytest.raises(Killed):
        results.upsert_jsonl(path, dict(rows[3], mean=-1.0))
    monkeypatch.setattr(json, "dumps", real_dumps)
    assert results.read_jsonl(path) == rows
    assert os.listdir(tmp_path) == ["rows.jsonl"]  # no temporary file left behind
    results.upsert_jsonl(path, dict(rows[3], mean=-1.0))
    assert results.read_jsonl(path) == rows[:3] + rows[4:] + [dict(rows[3], mean=-1.0)]


def test_upsert_by_two_writers_keeps_both_rows(tmp_path):
    """Writers in separate processes at once: each row survives (the read-modify-write is locked)."""
    path = tmp_path / "rows.jsonl"
    files.write_jsonl(str(path), _rows(20000))  # a rewrite that takes a while
    code = ("import sys; from wmdd_jax import results; "
            "[results.upsert_jsonl(sys.argv[1], {'method': sys.argv[2] + str(i)}) for i in range(5)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), name], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT}) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    methods = {r["method"] for r in results.read_jsonl(str(path))}
    assert {f"{name}{i}" for name in "ab" for i in range(5)} <= methods and len(methods) == 20010


def test_a_cut_off_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')  # a writer killed mid-line
    with pytest.warns(UserWarning, match="cut-off last line"):
        assert files.read_jsonl(str(path)) == [{"step": 1}, {"step": 2}]
    with pytest.warns(UserWarning):
        files.append_jsonl(str(path), {"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    # A damaged line with rows after it is not a cut-off write: it is named, not skipped.
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2 is not a JSON line"):
        files.read_jsonl(str(path))


def test_unreadable_json_is_the_default_with_a_warning(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text('{"pretrain": 12.')
    with pytest.warns(UserWarning, match="stage times"):
        assert files.read_json(str(path), default={}, what="stage times") == {}
    files.write_json(str(path), {"a": 1})
    assert files.read_json(str(path)) == {"a": 1}


def test_truncated_timings_do_not_stop_a_run(tmp_path):
    from wmdd_jax import pipeline

    (tmp_path / "timings.json").write_text('{"pretrain": 1')
    ran = []
    with pytest.warns(UserWarning, match="unreadable"):
        pipeline._run(None, str(tmp_path), [("pretrain", lambda c, w: ran.append("pretrain"))])
    assert ran == ["pretrain"] and set(json.loads((tmp_path / "timings.json").read_text())) == {"pretrain"}


HOLD_LOCK = ("import sys, time; from wmdd_jax.files import WorkdirLock; "
             "lock = WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": ROOT}, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on .*use another --workdir"):
            files.WorkdirLock(str(tmp_path)).acquire()
        # The processes of one distributed run take their own locks in the shared folder.
        with files.WorkdirLock(str(tmp_path), ".lock.process1"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing anything: its lock file is stale and taken over.
    assert f"process {holder.pid}" in (tmp_path / ".lock").read_text()
    with files.WorkdirLock(str(tmp_path)) as lock:
        assert f"process {os.getpid()}" in (tmp_path / ".lock").read_text()
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            files.WorkdirLock(str(tmp_path)).acquire()
    lock.release()  # twice is harmless
    files.WorkdirLock(str(tmp_path)).acquire().release()


def test_two_commands_on_one_work_directory(tmp_path):
    """The second of two CLI runs started together on one work directory says who holds it."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "wmdd_jax", "pretrain", "--config=configs/fashion_mnist.py",
                              f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"wmdd_jax: error: {tmp_path} is in use by process {holder.pid} on {os.uname().nodename}: wait for that "
        f"run to end (or stop it), or use another --workdir"]
    assert time.time() - t0 < 120 and not (tmp_path / "teacher").exists()
