"""Regenerates the results tables of README.md and docs/results.md from experiments/results/*.jsonl.

    python experiments/make_tables.py          # rewrite the tables in place
    python experiments/make_tables.py --check  # exit 1 if a file's tables differ from the rows

Each table sits between ``<!-- table:NAME:begin -->`` and ``<!-- table:NAME:end -->`` in a file;
only those blocks are generated, the prose around them is written by hand. The tables are never
typed by hand: tests/test_make_tables.py fails when a committed file differs from what this
script makes of the committed rows.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("README.md", os.path.join("docs", "results.md"))
BLOCK = re.compile(r"(<!-- table:([a-z_]+):begin -->\n).*?(<!-- table:\2:end -->)", re.S)
MARKS = "†‡§¶"
# The experiment drivers' default teacher: README's short table shows the rows made with it.
HEADLINE_TEACHER = "experiments/teachers/fashion_mnist_convnet3_bn"
FASHION_MNIST_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Boot")


def _pm(r: dict) -> str:
    return f"{r['mean']:.2f}" if r["n_seeds"] == 1 else f"{r['mean']:.2f} ± {r['std']:.2f}"


def teacher_marks(rows: list[dict]) -> dict[str, str]:
    """A footnote mark per committed teacher named by the rows."""
    teachers = sorted({r["teacher"] for r in rows if r.get("teacher")})
    return {t: MARKS[i] if i < len(MARKS) else f"[{i + 1}]" for i, t in enumerate(teachers)}


def accuracy_table(rows: list[dict]) -> str:
    """Every test-accuracy row: teachers first, then by method, model, labels and IPC."""
    rows = [r for r in rows if r.get("metric") == "test_accuracy"]
    if not rows:
        return ""
    marks = teacher_marks(rows)
    rows = sorted(rows, key=lambda r: (r["dataset"], r["method"] != "teacher", r["method"], r["model"],
                                       r.get("label_mode") or "", r.get("ipc") or 0, r.get("teacher") or "",
                                       r.get("variant") or ""))
    lines = ["| dataset | method | model | labels | IPC | test accuracy % | seeds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ipc = "full" if r.get("ipc") is None else r["ipc"]
        method = r["method"] + (f" {marks[r['teacher']]}" if r.get("teacher") else "")
        method += f" [`{r['variant']}`]" if r.get("variant") else ""
        lines.append(f"| {r['dataset']} | {method} | {r['model']} | {r.get('label_mode') or ''} | {ipc} | "
                     f"{_pm(r)} | {r['n_seeds']} |")
    if marks:
        lines += ["", "; ".join(f"{m}: the teacher `{t}`" for t, m in marks.items()) + " (a teacher row is that "
                  "teacher; any other row used its synthesis targets and soft labels). Unmarked rows need no "
                  "teacher (random real images, hard labels). `[key=value]`: a recipe other than the config's."]
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
        teacher = marks.get(r.get("teacher"), "")
        variant = f" [`{r['variant']}`]" if r.get("variant") else ""
        lines.append(f"| {r['dataset']} | {r.get('label_mode') or ''} | {r['ipc']} | {teacher} | "
                     f"{r['mean']:.2f} ± {r['std']:.2f} ({r['n_seeds']}){variant} | {rr} | {rr_gap} | {nb} | {nb_gap} "
                     f"| {sel} | {sel_gap} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def headline_table(rows: list[dict], teacher: str = HEADLINE_TEACHER) -> str:
    """README's short table: soft labels, one teacher, the config's students; methods by IPC."""
    rows = [r for r in rows if r.get("metric") == "test_accuracy" and r.get("teacher") == teacher]
    cells = [r for r in rows if r.get("label_mode") == "soft" and r.get("ipc") is not None
             and not any(o.startswith("eval.") for o in (r.get("variant") or "").split())]
    if not cells:
        return ""
    ipcs = sorted({r["ipc"] for r in cells})
    variants = sorted({r["variant"] for r in cells if r.get("variant")})
    names = {"wmdd": "WMDD", "random_real": "random real", "no_barycenter": "no barycenter (SRe2L-style)",
             "barycenter_real": "nearest real images, not optimised"}
    lines = ["| ConvNet-3 students, soft labels | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
             "|---|" + "---|" * len(ipcs)]
    for method, name in names.items():
        by_ipc = {r["ipc"]: r for r in cells if r["method"] == method}
        if not by_ipc:
            continue
        out = []
        for ipc in ipcs:
            r = by_ipc.get(ipc)
            note = f" ({variants.index(r['variant']) + 1})" if r is not None and r.get("variant") else ""
            out.append("" if r is None else f"{_pm(r)}{note}")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    notes = [f"({i + 1}) `{v}`" for i, v in enumerate(variants)]
    teachers = [r for r in rows if r["method"] == "teacher"]
    if teachers:
        notes.append(f"teacher `{teacher}`: {_pm(teachers[-1])}% test accuracy")
    return "\n".join(lines + ([""] + ["; ".join(notes) + "."] if notes else []))


def cross_split_table(rows: list[dict]) -> str:
    """The same students scored on the held-out validation images and on the test images
    (experiments/cross_split.py): each candidate, then WMDD minus random real, paired by seed."""
    if not rows:
        return ""
    lines = ["| dataset | IPC | teacher | students | seeds | validation % | test % |", "|---|---|---|---|---|---|---|"]
    per_class = []
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["ipc"], r["teacher"]), []).append(r)
    for (dataset, ipc, teacher), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r["method"] != "wmdd")
        head = f"| {dataset} | {ipc} | `{os.path.basename(teacher)}` |"
        for r in group:
            stats = [f"{np.mean(r[s]):.2f} ± {np.std(r[s]):.2f}" for s in ("validation", "test")]
            lines.append(f"{head} {r['method']} (`{r['candidate']}`) | {', '.join(map(str, r['seeds']))} "
                         f"| {stats[0]} | {stats[1]} |")
        wmdd = [r for r in group if r["method"] == "wmdd"]
        real = [r for r in group if r["method"] == "random_real"]
        if wmdd and real and wmdd[0]["seeds"] == real[0]["seeds"]:
            a, b = wmdd[0], real[0]
            diffs = {s: np.subtract(a[s], b[s]) for s in ("validation", "test")}
            shown = [f"{d.mean():+.2f} ({', '.join(f'{x:+.2f}' for x in d)})" for d in diffs.values()]
            lines.append(f"{head} WMDD − random real, per seed | {', '.join(map(str, a['seeds']))} "
                         f"| {shown[0]} | {shown[1]} |")
            classes = [np.subtract(np.mean(a[f"{s}_per_class"], 0), np.mean(b[f"{s}_per_class"], 0))
                       for s in ("validation", "test")]
            names = FASHION_MNIST_CLASSES if dataset == "fashion_mnist" else range(len(classes[0]))
            per_class.append((f"{dataset}, IPC {ipc}, `{os.path.basename(teacher)}`", names, classes))
    for title, names, (val, test) in per_class:
        lines += ["", f"| WMDD − random real per class, mean of seeds ({title}) | "
                  + " | ".join(map(str, names)) + " |", "|---|" + "---|" * len(names),
                  "| validation | " + " | ".join(f"{x:+.1f}" for x in val) + " |",
                  "| test | " + " | ".join(f"{x:+.1f}" for x in test) + " |"]
    return "\n".join(lines)


def throughput_table(rows: list[dict]) -> str:
    rows = [r for r in rows if "images_per_s" in r]
    if not rows:
        return ""
    lines = ["| benchmark | implementation | norm | batch | images/s (median) | range | date (code) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r.get("min_max_images_per_s", ["", ""])
        code = f" ({r['code_commit'][:7]})" if r.get("code_commit") else ""  # one date can hold two runs
        lines.append(f"| {r.get('benchmark', '')} | {r.get('impl', '')} | {r.get('norm', '')} | {r.get('batch', '')} "
                     f"| {r['images_per_s']:.0f} | {lo:.0f}-{hi:.0f} | {r.get('date', '')}{code} |")
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


def evaluate_table(rows: list[dict]) -> str:
    """The evaluate stage's students: one at a time, stacked, and PyTorch (experiments/bench_evaluate.py)."""
    if not rows:
        return ""
    order = {"before": 0, "sequence": 1, "after": 2, "stacked": 3, "pytorch": 4}
    rows = sorted(rows, key=lambda r: (r["devices"], r.get("machine", ""), r["ipc"], r["epochs"],
                                       r.get("compilation_cache") or "",
                                       order.get(r["variant"], 4), r.get("dtype") or "",
                                       r.get("weight_init") or ""))
    lines = ["| IPC | epochs (steps per student) | devices | variant | wall s, 3 students | PyTorch's time / ours "
             "| warm student steps/s | MiB per device | host CPU stolen % | test accuracy % (per seed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warm, speedup = r.get("warm_student_steps_per_s"), r.get("speedup_vs_pytorch")
        mib, steal = r.get("per_device_mib"), r.get("steal_pct")  # steal_pct: rows from f7eb210 on
        variant = r["variant"] + (f" ({r['dtype']})" if r.get("dtype") else "")
        if (r.get("concurrent_with") or 1) > 1:  # the seeds in threads at once (rows from 4521f81 on)
            variant += " (concurrent)"
        if r.get("weight_init") == "torch":  # rows without it drew kaiming (bench_evaluate.py --weight-init)
            variant += " (PyTorch's init)"
        if r.get("machine", "2-core CPU") != "2-core CPU":  # shared with other runs, or another machine
            variant += f" [{r['machine']}]"
        if r.get("compilation_cache") == "warm":  # the JAX variants read their programs from a filled cache
            variant += " (same run)" if r["variant"] == "pytorch" else " (warm compilation cache)"
        lines.append(f"| {r['ipc']} | {r['epochs']} ({r['steps_per_student']}) | {r['devices']} | {variant} "
                     f"| {r['wall_s']:.0f} | {'' if speedup is None else f'{speedup:.2f}'} | {'' if warm is None else f'{warm:.1f}'} "
                     f"| {'' if mib is None else f'{mib:.0f}'} | {'' if steal is None else f'{steal:.0f}'} "
                     f"| {_pm(dict(r, n_seeds=len(r['accuracies'])))} "
                     f"({', '.join(f'{v:.2f}' for v in r['accuracies'])}) |")
    return "\n".join(lines)


def teacher_devices_table(rows: list[dict]) -> str:
    """The teacher trained on 1 and on N simulated devices (experiments/teacher_devices.py)."""
    if not rows:
        return ""
    rows = sorted(rows, key=lambda r: (r["epochs"], r["devices"], r["seed"]))
    lines = ["| simulated devices | seed | epochs (steps) | test accuracy % | max abs difference of weights and BN statistics vs 1 device |",
             "|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("max_abs_diff_vs_one_device")
        lines.append(f"| {r['devices']} | {r['seed']} | {r['epochs']} ({r['steps']}) | {r['test_accuracy']:.2f} "
                     f"| {'' if diff is None else f'{diff:.2g}'} |")
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
        common = " ".join(a for a in r["command"].split() if a.startswith("--config."))
        reference = r["method"] == "random_real"
        name = f"`{r['candidate']}`" + (" (the reference: random real images)" if reference else "")
        teacher = os.path.basename(r.get("teacher", ""))
        lines.append(f"| {r['dataset']} | {r['ipc']} | `{teacher}` | {name} | `{common}` "
                     f"| {r['values'][0]:.2f} | {_pm(r)} | {r['n_seeds']} |")
    return "\n".join(lines)


def plan_table(rows: list[dict]) -> str:
    """`plan` on pod targets (experiments/plan_targets.py): compiled-program estimates, not measured times."""
    if not rows:
        return ""
    lines = ["| config | IPC | target | stage (program) | fits | GiB per device (of) | TFLOP / step | GB / step "
             "| steps | roofline estimate | layout |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["stage"] if r["program"] == r["stage"] else f"{r['stage']} ({r['program']})"
        if not r.get("compiled"):
            lines.append(f"| {os.path.basename(r['config'])} | {r['ipc']} | {r['target']} | {name} | no | did not "
                         f"compile: {r.get('error', '')[:80]} | | | | | |")
            continue
        est = r["estimated_seconds"]
        est = f"{est:.1f} s" if est < 120 else f"{est / 60:.1f} min" if est < 7200 else f"{est / 3600:.1f} h"
        lines.append(f"| {os.path.basename(r['config'])} | {r['ipc']} | {r['target']} | {name} "
                     f"| {'yes' if r['fits'] else '**no**'} | {r['per_device_bytes'] / 2**30:.2f} "
                     f"({r['device_memory_bytes'] / 2**30:.0f}) | {(r['flops_per_step'] or 0) / 1e12:.3f} "
                     f"| {(r['bytes_per_step'] or 0) / 1e9:.2f} | {r['steps']} | {est} | {r['layout']} |")
    return "\n".join(lines)


def plan_check_table(rows: list[dict]) -> str:
    """`plan`'s roofline estimate for cpu:1 against the measured step of the same program here."""
    if not rows:
        return ""
    lines = ["| config | IPC | program | estimated step s | measured step s (median) | measured / estimate "
             "| commit |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {os.path.basename(r['config'])} | {r['ipc']} | {r['program']} "
                     f"| {r['estimated_step_seconds']:.4f} | {r['measured_step_seconds']:.4f} "
                     f"| {r['measured_over_estimate']:.2f} | {r['code_commit'][:7]} |")
    return "\n".join(lines)


def load_rows(root: str = ROOT) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "experiments", "results", "*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def tables(rows: list[dict]) -> dict[str, str]:
    """Table name -> its markdown (an empty string when no row feeds it)."""
    acc = [r for r in rows if r.get("metric") == "test_accuracy"]
    return {
        "headline": headline_table(acc),
        "accuracy": accuracy_table(acc),
        "criterion": criterion_table(acc),
        "tuning": tuning_table([r for r in rows if r.get("metric") == "validation_accuracy"]),
        "cross_split": cross_split_table([r for r in rows if r.get("metric") == "cross_split"]),
        "throughput": throughput_table([r for r in rows if r.get("benchmark") in ("train_step", "synthesis_step")]),
        "scaling": scaling_table([r for r in rows if r.get("benchmark") == "synthesis_scaling"]),
        "evaluate": evaluate_table([r for r in rows if r.get("benchmark") == "evaluate"]),
        "teacher_devices": teacher_devices_table([r for r in rows if r.get("benchmark") == "teacher_devices"]),
        "plan": plan_table([r for r in rows if r.get("kind") == "plan"]),
        "plan_check": plan_check_table([r for r in rows if r.get("kind") == "cpu_check"]),
    }


def fill(text: str, made: dict[str, str]) -> str:
    """``text`` with every table block replaced by its generated table; an unknown name is an error."""
    def block(match):
        if match.group(2) not in made:
            raise KeyError(f"no table named {match.group(2)!r}; make_tables knows {sorted(made)}")
        body = made[match.group(2)]
        return f"{match.group(1)}{body}\n{match.group(3)}" if body else f"{match.group(1)}{match.group(3)}"
    return BLOCK.sub(block, text)


def render(root: str = ROOT) -> dict[str, tuple[str, str]]:
    """Relative path -> (its text now, its text with regenerated tables), for README.md and docs/results.md."""
    made = tables(load_rows(root))
    out = {}
    for name in FILES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text = f.read()
        out[name] = (text, fill(text, made))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = parser.parse_args()
    stale = []
    for name, (old, new) in render().items():
        if old == new:
            continue
        stale.append(name)
        if not args.check:
            with open(os.path.join(ROOT, name), "w", encoding="utf-8") as f:
                f.write(new)
    if args.check and stale:
        sys.exit(f"{', '.join(stale)}: tables differ from experiments/results/*.jsonl; "
                 "run python experiments/make_tables.py")
    print(f"{'stale' if args.check else 'rewrote'}: {', '.join(stale)}" if stale else "tables up to date")


if __name__ == "__main__":
    main()
