"""Bad and edge inputs through the command line, as a new user would give them: what each one does.

Runs every case against the source tree ``--tree`` (default: this checkout; pass an older
checkout to compare) on the committed Fashion-MNIST test subset with a tiny teacher, and prints
one Markdown row per case: the exit status and the first line of the error, or what a run that
exited 0 reported. Nothing is written to the repository.

    python experiments/bad_inputs.py [--tree DIR] [--only NAME ...] > table.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "data" / "fashion_mnist"
TINY = [f"--config.data.data_dir={SUBSET}", "--config.conv_impl=lax", "--config.teacher.width=8",
        "--config.teacher.epochs=1", "--config.teacher.batch_size=64", "--config.eval.hard.width=8",
        "--config.eval.soft.width=8", "--config.eval.hard.epochs=1", "--config.eval.soft.epochs=1",
        "--config.eval.seeds=(0,)", "--config.ipc=2", "--config.synthesis.iterations=2",
        "--config.barycenter.num_iterations=10"]
FM = "--config=configs/fashion_mnist.py"


def run(tree, args, workdir, cwd=None, extra=()):
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "wmdd_jax", *args, *extra, f"--workdir={workdir}"],
                         cwd=cwd or tree, env=env, capture_output=True, text=True, timeout=900)
    return out, time.time() - t0


def _labels(labels):
    return gzip.compress(struct.pack(">HBBI", 0, 8, 1, len(labels)) + bytes(labels))


def damaged_data(tmp, name, change):
    folder = tmp / f"data_{abs(hash(name + str(change))) % 10**6}"
    shutil.copytree(SUBSET, folder)
    path = folder / name
    path.write_bytes(change(path.read_bytes()))
    return folder


def summarise(out, workdir) -> str:
    if out.returncode != 0:
        # Progress bars (tqdm, on stderr, ended by carriage returns) are not part of the message.
        lines = [line.split("\r")[-1] for line in out.stderr.strip().splitlines()]
        lines = [line for line in lines if line.strip() and not line.rstrip().endswith(("it/s]", "s/it]"))]
        traceback = any(line.startswith("Traceback") for line in lines)
        last = lines[-1] if lines else ""
        first = lines[0] if lines else ""
        shown = last if traceback else first
        kind = "traceback" if traceback else ("one line" if len(lines) == 1 else f"{len(lines)} lines")
        return f"exit {out.returncode}, {kind}: `{shown[:220]}`"
    summary = pathlib.Path(workdir) / "eval" / "summary.jsonl"
    rows = [json.loads(line) for line in summary.read_text().splitlines() if line.strip()] if summary.exists() else []
    tail = [line for line in out.stdout.strip().splitlines() if line.strip()][-1:] or [""]
    note = f"; summary.jsonl: {len(rows)} rows, ipc {[r.get('ipc') for r in rows]}" if rows else ""
    return f"exit 0: `{tail[0][:160]}`{note}"


def cases(tree, tmp):
    """(name, function returning the summary) for every case."""
    base = tmp / "base"  # a finished tiny teacher, statistics, barycenters and images

    def prepared(name):
        dst = tmp / name
        shutil.copytree(base, dst)
        return dst

    def simple(args, cwd=None):
        def go():
            wd = tmp / f"w{abs(hash(tuple(args))) % 10**8}"
            return summarise(run(tree, args, wd, cwd=cwd, extra=())[0], wd)
        return go

    def data_case(name, change, stage="pretrain"):
        def go():
            folder = damaged_data(tmp, name, change)
            wd = tmp / f"d{abs(hash(str(folder))) % 10**8}"
            return summarise(run(tree, [stage, FM, *TINY, f"--config.data.data_dir={folder}"], wd)[0], wd)
        return go

    def other_teacher():
        wd = prepared("swap")
        shutil.rmtree(wd / "eval", ignore_errors=True)
        other = tmp / "other_teacher"
        if not other.exists():
            out, _ = run(tree, ["pretrain", FM, *TINY, "--config.seed=1"], other)
            assert out.returncode == 0, out.stderr[-2000:]
        return summarise(run(tree, ["all", FM, *TINY, f"--config.teacher.checkpoint={other}/teacher"], wd)[0], wd)

    def ipc_mismatch():
        wd = prepared("ipc5")
        return summarise(run(tree, ["evaluate", FM, *TINY, "--config.ipc=5"], wd)[0], wd)

    def rerun_all():
        wd = prepared("rerun")
        for _ in range(2):
            out, _ = run(tree, ["all", FM, *TINY], wd)
        return summarise(out, wd)

    def folder_set(transform):
        def go():
            import numpy as np
            from PIL import Image

            folder = tmp / f"set{abs(hash(transform.__name__)) % 10**6}"
            rng = np.random.default_rng(0)
            for k in range(10):
                (folder / f"new{k:03d}").mkdir(parents=True, exist_ok=True)
                for i in range(2):
                    Image.fromarray((rng.uniform(size=(28, 28)) * 255).astype(np.uint8)).save(
                        folder / f"new{k:03d}" / f"class{k:03d}_id{i:03d}.png")
            transform(folder)
            wd = tmp / f"e{abs(hash(str(folder))) % 10**8}"
            return summarise(run(tree, ["evaluate", FM, *TINY, f"--config.eval.source={folder}"], wd)[0], wd)
        return go

    def drop_class9(folder):
        shutil.rmtree(folder / "new009")

    def rename_folders(folder):
        for k in range(10):
            (folder / f"new{k:03d}").rename(folder / f"class{k:03d}")

    def corrupt_image(folder):
        (folder / "new003" / "class003_id000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    def truncated_npz():
        wd = prepared("cutnpz")
        shutil.rmtree(wd / "eval", ignore_errors=True)
        path = wd / "synthetic" / "images.npz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return summarise(run(tree, ["evaluate", FM, *TINY], wd)[0], wd)

    def two_at_once():
        wd = tmp / "two"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, "-m", "wmdd_jax", "pretrain", FM, *TINY, "--config.teacher.epochs=3", f"--workdir={wd}"]
        procs = [subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        time.sleep(3)
        procs.append(subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        outs = [p.communicate(timeout=900) for p in procs]
        results = [subprocess.CompletedProcess(cmd, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
        return "first: " + summarise(results[0], wd) + "; second: " + summarise(results[1], wd)

    def lr_diverges():
        wd = tmp / "lr"
        return summarise(run(tree, ["pretrain", FM, *TINY, "--config.teacher.lr=1e6"], wd)[0], wd)

    def outside_repo():
        # Only the package on the path (as an installed wmdd_jax would be), not the checkout's configs/.
        wd, path = tmp / "outside", tmp / "package_only"
        path.mkdir(exist_ok=True)
        if not (path / "wmdd_jax").exists():
            (path / "wmdd_jax").symlink_to(tree / "wmdd_jax")
        env = {**os.environ, "PYTHONPATH": str(path)}
        out = subprocess.run([sys.executable, "-m", "wmdd_jax", "evaluate", f"--config={tree}/configs/fashion_mnist.py",
                              *TINY, "--config.ipc=0", f"--workdir={wd}"], cwd=tmp, env=env, capture_output=True,
                             text=True, timeout=900)
        return summarise(out, wd)

    (tmp / "a_file").write_text("")
    return [
        ("ipc 0", simple(["evaluate", FM, *TINY, "--config.ipc=0", "--config.eval.source=random_real"])),
        ("ipc -3", simple(["evaluate", FM, *TINY, "--config.ipc=-3", "--config.eval.source=random_real"])),
        ("--config.ipcs=3", simple(["pretrain", FM, "--config.ipcs=3"])),
        ("configs/fashion_mnist.py:qick", simple(["pretrain", FM + ":qick"])),
        ("run outside the repo", outside_repo),
        ("optimizer typo", simple(["pretrain", FM, *TINY, "--config.teacher.optimizer=sdg"])),
        ("schedule typo", simple(["pretrain", FM, *TINY, "--config.teacher.schedule=cosin"])),
        ("model typo", simple(["pretrain", FM, *TINY, "--config.teacher.model=convnet5"])),
        ("eval.seeds=(0,0,0)", simple(["evaluate", FM, *TINY, "--config.eval.seeds=(0,0,0)",
                                       "--config.eval.source=random_real"])),
        ("work dir is a file", lambda: summarise(run(tree, ["pretrain", FM, *TINY], tmp / "a_file")[0], tmp)),
        ("work dir under a file", lambda: summarise(run(tree, ["pretrain", FM, *TINY], tmp / "a_file" / "x")[0], tmp)),
        ("missing dataset", simple(["pretrain", FM, "--config.data.data_dir=/nonexistent"])),
        ("idx label 200", data_case("train-labels-idx1-ubyte.gz", lambda b: _labels([200] + [k % 10 for k in range(399)]))),
        ("label/image count mismatch", data_case("train-labels-idx1-ubyte.gz",
                                                 lambda b: _labels([k % 10 for k in range(390)]))),
        ("truncated .gz", data_case("train-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2])),
        ("garbage .gz", data_case("train-images-idx3-ubyte.gz", lambda b: b"garbage")),
        ("teacher lr 1e6", lr_diverges),
        ("another teacher in a finished work dir", other_teacher),
        ("evaluate ipc=5 on an IPC-2 set", ipc_mismatch),
        ("`all` rerun on a finished work dir", rerun_all),
        ("image folder without new009", folder_set(drop_class9)),
        ("class000/ folders", folder_set(rename_folders)),
        ("corrupt image in a folder", folder_set(corrupt_image)),
        ("truncated finished images.npz", truncated_npz),
        ("two runs on one work dir", two_at_once),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(REPO), help="the source tree to run (its wmdd_jax/ and configs/)")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    args = parser.parse_args()
    tree = pathlib.Path(args.tree).resolve()
    with tempfile.TemporaryDirectory(prefix="wmdd-bad-inputs-") as tmp:
        tmp = pathlib.Path(tmp)
        out, _ = run(tree, ["all", FM, *TINY], tmp / "base")
        assert out.returncode == 0, out.stderr[-3000:]
        print(f"| input | {tree.name} |\n|---|---|", flush=True)
        for name, case in cases(tree, tmp):
            if args.only and name not in args.only:
                continue
            try:
                result = case()
            except Exception as e:  # the probe itself failed: say so in the row
                result = f"probe failed: {type(e).__name__}: {e}"[:200]
            print(f"| {name} | {result.replace('|', '/')} |", flush=True)


if __name__ == "__main__":
    main()
