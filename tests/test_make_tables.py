"""experiments/make_tables.py: the README's tables come from the JSON lines, sorted and labelled."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_tables():
    spec = importlib.util.spec_from_file_location("make_tables", os.path.join(ROOT, "experiments", "make_tables.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(candidate, values, teacher, method="wmdd", std=0.0):
    return dict(dataset="fashion_mnist", method=method, ipc=50, metric="validation_accuracy",
                mean=round(sum(values) / len(values), 2), std=std, values=values, n_seeds=len(values),
                candidate=candidate, teacher=f"experiments/teachers/{teacher}",
                command=f"python experiments/tune_fashion_mnist.py --only '{candidate}' "
                        "--config.synthesis.iterations=500")


def test_tuning_table_groups_by_teacher_and_ranks_candidates_by_seed_0():
    rows = [_row("lr=0.1", [89.78], "a"), _row("random_real", [89.18, 89.8, 89.6], "a", method="random_real", std=0.26),
            _row("base", [90.28, 89.83, 89.92], "a", std=0.19), _row("base", [88.0], "b")]
    lines = _make_tables().tuning_table(rows).splitlines()[2:]
    assert [line.split(" | ")[3].split("`")[1] for line in lines] == ["base", "lr=0.1", "random_real", "base"]
    assert [line.split(" | ")[2] for line in lines] == ["`a`", "`a`", "`a`", "`b`"]
    assert "| 90.28 | 90.01 ± 0.19 | 3 |" in lines[0] and "| 89.78 | 89.78 | 1 |" in lines[1]
    assert "(the reference: random real images)" in lines[2]
    assert "`--config.synthesis.iterations=500`" in lines[0]
    assert _make_tables().tuning_table([]) == ""
