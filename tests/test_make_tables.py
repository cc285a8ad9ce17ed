"""experiments/make_tables.py: the tables of README.md and docs/results.md come from the JSON lines."""

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


def _test_row(method, values, std, ipc=50, label_mode="soft", teacher="experiments/teachers/a", variant=None):
    row = dict(dataset="fashion_mnist", method=method, model="convnet3", ipc=ipc, label_mode=label_mode,
               metric="test_accuracy", mean=round(sum(values) / len(values), 2), std=std, values=values,
               n_seeds=len(values), teacher=teacher)
    return dict(row, variant=variant) if variant else row


def test_criterion_table_pairs_rows_of_one_teacher_and_recipe():
    rows = [_test_row("wmdd", [88.0, 88.2], 0.1), _test_row("random_real", [87.0, 87.0], 0.3),
            _test_row("random_real", [90.0], 0.0, teacher="experiments/teachers/b"),  # another teacher: not paired
            _test_row("no_barycenter", [87.9, 87.9], 0.2),
            _test_row("wmdd", [87.0], 0.1, variant="synthesis.iterations=500"),
            _test_row("no_barycenter", [86.0], 0.05, variant="synthesis.iterations=500"),
            _test_row("wmdd", [60.0], 1.0, label_mode="hard"),
            _test_row("random_real", [70.0], 0.5, label_mode="hard", teacher=None),  # hard labels: no teacher
            _test_row("barycenter_real", [88.5, 88.5], 0.0),  # no steps: paired with every synthesis recipe
            _test_row("wmdd", [80.0], 0.1, variant="synthesis.iterations=500 eval.soft.augment.cutmix=1.0"),
            _test_row("random_real", [79.0], 0.1, variant="eval.soft.augment.cutmix=1.0"),  # same students
            _test_row("wmdd", [50.0], 1.0, ipc=1)]  # nothing to compare with: no line
    lines = _make_tables().criterion_table(rows).splitlines()[2:]
    assert len(lines) == 4
    hard, plain, variant, cutmix = lines
    assert "| hard |" in hard and "| 70.00 ± 0.50 (1) | -10.00 (no) |" in hard
    assert ("| † | 88.10 ± 0.10 (2) | 87.00 ± 0.30 (2) | +1.10 (yes) | 87.90 ± 0.20 (2) | +0.20 (no) "
            "| 88.50 ± 0.00 (2) | -0.40 (no) |") in plain
    assert ("[`synthesis.iterations=500`] | 87.00 ± 0.30 (2) | +0.00 (no) | 86.00 ± 0.05 (1) | +1.00 (yes) "
            "| 88.50 ± 0.00 (2) | -1.50 (no) |") in variant
    assert hard.endswith("|  |  |  |  |")
    assert "| 79.00 ± 0.10 (1) | +1.00 (yes) |  |  |  |  |" in cutmix
    assert _make_tables().criterion_table([_test_row("wmdd", [1.0], 0.0)]) == ""


def test_committed_tables_are_what_the_committed_rows_make():
    """README.md and docs/results.md hold exactly the tables of experiments/results/*.jsonl: a row
    edited, added or removed without `python experiments/make_tables.py` fails here."""
    for name, (committed, generated) in _make_tables().render().items():
        assert committed == generated, f"{name} is stale: run python experiments/make_tables.py"


def test_fill_replaces_only_named_blocks_and_check_reports_stale_files(tmp_path):
    module = _make_tables()
    text = ("prose\n<!-- table:tuning:begin -->\nold\n<!-- table:tuning:end -->\nmore prose\n"
            "<!-- table:scaling:begin -->\n<!-- table:scaling:end -->\n")
    filled = module.fill(text, {"tuning": "| a |", "scaling": ""})
    assert filled == ("prose\n<!-- table:tuning:begin -->\n| a |\n<!-- table:tuning:end -->\nmore prose\n"
                      "<!-- table:scaling:begin -->\n<!-- table:scaling:end -->\n")
    assert module.fill(filled, {"tuning": "| a |", "scaling": ""}) == filled  # a second run changes nothing
    try:
        module.fill(text, {"tuning": ""})
    except KeyError as e:
        assert "scaling" in str(e)
    else:
        raise AssertionError("an unknown table name must fail")


def test_headline_shows_one_teacher_soft_labels_and_the_configs_students():
    rows = [_test_row("wmdd", [80.0], 0.0, ipc=10), _test_row("random_real", [79.0], 0.0, ipc=10),
            _test_row("wmdd", [88.0], 0.0, variant="synthesis.iterations=500"),
            _test_row("wmdd", [70.0], 0.0, variant="eval.soft.augment.cutmix=1.0"),  # other students: left out
            _test_row("wmdd", [60.0], 0.0, label_mode="hard"),  # hard labels: left out
            _test_row("wmdd", [99.0], 0.0, ipc=1, teacher="experiments/teachers/b"),  # another teacher
            dict(_test_row("teacher", [92.0], 0.0), ipc=None, label_mode="hard")]
    lines = _make_tables().headline_table(rows, teacher="experiments/teachers/a").splitlines()
    assert lines[0] == "| ConvNet-3 students, soft labels | IPC 10 | IPC 50 |"
    assert lines[2] == "| WMDD | 80.00 | 88.00 (1) |"
    assert lines[3] == "| random real | 79.00 |  |"
    assert lines[-1] == "(1) `synthesis.iterations=500`; teacher `experiments/teachers/a`: 92.00% test accuracy."
