"""A run of the baseline condition alone (a calibration of one condition's accuracy) finishes its report: no test
compares two conditions, so the cost table has no row, yet keeps its columns (kvprime.analysis.cost)."""

import json

import pandas as pd

from kvprime.analysis import cost


def test_the_cost_table_of_no_test_has_its_columns():
    costs = pd.DataFrame({"condition": ["joint"], **{c: [1.0] for c in cost.COST_COLUMNS}})
    tests = pd.DataFrame(columns=["name", "treatment", "reference", "mean_delta", "ci_low", "ci_high", "verdict"])
    table = cost.cost_table(costs, tests)
    assert len(table) == 0 and list(table.columns) == list(cost.COST_TABLE_COLUMNS)


def test_a_baseline_only_run_writes_its_report_and_accuracy(tmp_path):
    from kvprime.config.compose import compose
    from kvprime.pipeline import runner

    cfg = compose(["experiment=multidoc", "model=tiny_random_llama", "dataset=synthetic_kv", "dataset.n_samples=3",
                   "condition=multidoc/independent", "stats.n_boot=1000", "progress=false", "answer.max_new_tokens=2"])
    runner.run_experiment(cfg, tmp_path / "run", only="multidoc/independent")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["condition"] for r in results["summary"]] == ["independent"] and results["costs"] == []
    assert [r["n_answers"] for r in results["answer_quality"]["summary"]] == [3]
    assert (tmp_path / "run" / "report.md").is_file()
