"""Regenerates README.md's results tables from experiments/results/*.jsonl (never typed by hand).

    python experiments/make_tables.py
"""

from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


MARKS = "†‡§¶"


def teacher_marks(rows: list[dict]) -> dict[str, str]:
    """A footnote mark per committed teacher named by the rows."""
    teachers = sorted({r["teacher"] for r in rows if r.get("teacher")})
    return {t: MARKS[i] if i < len(MARKS) else f"[{i + 1}]" for i, t in enumerate(teachers)}


def accuracy_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("metric") == "test_accuracy"]
    marks = teacher_marks(rows)
    rows.sort(key=lambda r: (r["dataset"], r["method"] != "teacher", r["method"], r["model"],
                             r.get("label_mode") or "", r.get("ipc") or 0))
    lines = ["| dataset | method | model | labels | IPC | test accuracy % | seeds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ipc = "full" if r.get("ipc") is None else r["ipc"]
        acc = f"{r['mean']:.2f}" if r["n_seeds"] == 1 else f"{r['mean']:.2f} ± {r['std']:.2f}"
        method = r["method"] + (" (committed)" if r.get("checkpoint") else "")
        method += f" {marks[r['teacher']]}" if r.get("teacher") else ""
        method += f" [`{r['variant']}`]" if r.get("variant") else ""
        lines.append(f"| {r['dataset']} | {method} | {r['model']} | {r.get('label_mode') or ''} | {ipc} | "
                     f"{acc} | {r['n_seeds']} |")
    if marks:
        lines += ["", "; ".join(f"{m} made with the teacher `{t}`" for t, m in marks.items()) + " (its synthesis "
                  "targets and soft labels); the other rows that need a teacher used an earlier run of the same "
                  "pretrain command (92.50%, not kept). `[key=value]`: a recipe other than the config's."]
    return "\n".join(lines)


def criterion_table(rows: list[dict]) -> str:
    """WMDD against random real and two ablations, each with the same teacher and labels.

    A WMDD row (any recipe variant) is paired with the random-real row of its dataset, model, IPC,
    label mode, teacher (any teacher for hard labels) and student recipe (its ``eval.*`` overrides),
    with the no-barycenter row of the same recipe, and with ``barycenter_real`` (WMDD's initial
    images, not optimised) of the same student recipe. "Ahead by more than one std" means the gap
    in means exceeds the larger of the two standard deviations.
    """
    rows = [r for r in rows if r.get("metric") == "test_accuracy" and r.get("ipc") is not None]
    marks = teacher_marks(rows)

    def same(r, method, variant):
        keys = ("dataset", "model", "ipc", "label_mode", "teacher")
        if method == "random_real" and r.get("label_mode") == "hard":
            keys = keys[:-1]  # random real images under hard labels need no teacher
        return [o for o in rows if o["method"] == method and o.get("variant") == variant
                and all(o.get(k) == r.get(k) for k in keys)]

    def versus(r, others):
        if not others:
            return "", ""
        o = others[-1]
        gap = r["mean"] - o["mean"]
        ahead = "yes" if gap > max(r["std"], o["std"]) else "no"
        return f"{o['mean']:.2f} ± {o['std']:.2f} ({o['n_seeds']})", f"{gap:+.2f} ({ahead})"

    lines = ["| dataset | labels | IPC | teacher | WMDD (seeds) | random real (seeds) | gap (> 1 std?) "
             "| no barycenter (seeds) | gap (> 1 std?) | nearest real, unoptimised (seeds) | gap (> 1 std?) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    wmdd = sorted((r for r in rows if r["method"] == "wmdd"),
                  key=lambda r: (r["dataset"], r.get("label_mode") or "", r["ipc"], r.get("teacher") or "",
                                 r.get("variant") or ""))
    for r in wmdd:
        # Random real and unoptimised images have no synthesis recipe: they share only its student recipe.
        students = " ".join(o for o in (r.get("variant") or "").split() if o.startswith("eval.")) or None
        rr, rr_gap = versus(r, same(r, "random_real", students))
        nb, nb_gap = versus(r, same(r, "no_barycenter", r.get("variant")))
        sel, sel_gap = versus(r, same(r, "barycenter_real", students))
        if not rr and not nb and not sel:
            continue
        teacher = marks.get(r.get("teacher"), "earlier run")
        variant = f" [`{r['variant']}`]" if r.get("variant") else ""
        lines.append(f"| {r['dataset']} | {r.get('label_mode') or ''} | {r['ipc']} | {teacher} | "
                     f"{r['mean']:.2f} ± {r['std']:.2f} ({r['n_seeds']}){variant} | {rr} | {rr_gap} | {nb} | {nb_gap} "
                     f"| {sel} | {sel_gap} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def throughput_table(rows: list[dict]) -> str:
    rows = [r for r in rows if "images_per_s" in r]
    if not rows:
        return ""
    lines = ["| benchmark | implementation | norm | batch | images/s (median) | range | date |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r.get("min_max_images_per_s", ["", ""])
        lines.append(f"| {r.get('benchmark', '')} | {r.get('impl', '')} | {r.get('norm', '')} | {r.get('batch', '')} "
                     f"| {r['images_per_s']:.0f} | {lo:.0f}-{hi:.0f} | {r.get('date', '')} |")
    return "\n".join(lines)


def scaling_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    rows = sorted(rows, key=lambda r: (r["classes"], r["devices"]))
    lines = ["| classes (x IPC 2, 16 px) | simulated devices | padded classes | synthesis step s (median) "
             "| per-device MiB (XLA) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['classes']} | {r['devices']} | {r['padded_classes']} | {r['step_s_median']:.3f} "
                     f"| {r['per_device_peak_mib']:.1f} |")
    return "\n".join(lines)


def tuning_table(rows: list[dict]) -> str:
    """The validation search (experiments/tune_fashion_mnist.py): one line per candidate, best seed 0 first."""
    if not rows:
        return ""
    # Candidates share student seed 0, so they are ranked (and compared) by it.
    rows = sorted(rows, key=lambda r: (r["dataset"], r["ipc"], r.get("teacher", ""), -r["values"][0]))
    lines = ["| dataset | IPC | teacher | search candidate (the base recipe with one change) "
             "| overrides for every candidate | seed 0 % | validation accuracy % | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['mean']:.2f}" if r["n_seeds"] == 1 else f"{r['mean']:.2f} ± {r['std']:.2f}"
        common = " ".join(a for a in r["command"].split() if a.startswith("--config."))
        reference = r["method"] == "random_real"
        name = f"`{r['candidate']}`" + (" (the reference: random real images)" if reference else "")
        teacher = os.path.basename(r.get("teacher", ""))
        lines.append(f"| {r['dataset']} | {r['ipc']} | `{teacher}` | {name} | `{common}` "
                     f"| {r['values'][0]:.2f} | {acc} | {r['n_seeds']} |")
    return "\n".join(lines)


def main() -> None:
    acc, speed, scaling, tuning = [], [], [], []
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "results", "*.jsonl"))):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        acc += [r for r in rows if r.get("metric") == "test_accuracy"]
        speed += [r for r in rows if r.get("benchmark") in ("train_step", "synthesis_step")]
        scaling += [r for r in rows if r.get("benchmark") == "synthesis_scaling"]
        tuning += [r for r in rows if r.get("metric") == "validation_accuracy"]
    tables = (accuracy_table(acc), criterion_table(acc), tuning_table(tuning), throughput_table(speed),
              scaling_table(scaling))
    body = "\n\n".join(t for t in tables if t)
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    block = f"{BEGIN}\n{body}\n{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
