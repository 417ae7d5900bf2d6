"""Accuracy by the gold document's slot and the gold fact's depth (kvprime.analysis.gold_position, issue 23 item 4):
the counts and shares against an independent count, two-hop samples in both gold documents, the Wilson interval,
and the tables and figure a tiny-model multidoc run writes."""

import json
from collections import defaultdict

import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from kvprime.analysis import gold_position
from kvprime.analysis.registry import AnalysisInput

TWOHOP = {"sample_id": "t", "gold_slot": 2, "gold_slots": [2, 0],
          "task_info": {"facts": [{"slot": 0, "depth": 0.9, "role": "hop2"}, {"slot": 1, "depth": 0.5,
                                                                               "role": "distractor"},
                                  {"slot": 2, "depth": 0.1, "role": "hop1"}]}}
KV = {"sample_id": "k", "gold_slot": 1, "gold_slots": [1],
      "task_info": {"facts": [{"slot": 1, "depth": 1.0, "role": "gold"}, {"slot": 0, "depth": 0.0, "role": "lure"}]}}
HOTPOT = {"sample_id": "h", "gold_slot": 3, "gold_slots": [3, 1]}  # a multi-hop format: no fact positions
SQUAD = {"sample_id": "s"}  # one passage, nothing recorded


def _run(inputs, rows, confidence=0.95):
    scores = pd.DataFrame(rows, columns=["sample_id", "condition", "nll", "exact_match", "contains"])
    return AnalysisInput(scores=scores, similarity=None, baseline="independent", seed=1, n_boot=100, alpha=0.05,
                         confidence=confidence, experiment={"name": "t"}, inputs=tuple(inputs))


def test_each_gold_fact_is_one_row_two_hop_in_both_documents():
    facts = gold_position.positions([TWOHOP, KV, HOTPOT, SQUAD])
    got = [(r.sample_id, r.role, r.slot, r.depth) for r in facts.itertuples()]
    assert got[:3] == [("t", "hop2", 0, 0.9), ("t", "hop1", 2, 0.1), ("k", "gold", 1, 1.0)]
    assert [(s, r, sl) for s, r, sl, _ in got[3:]] == [("h", "evidence1", 3), ("h", "evidence2", 1), ("s", "gold", 0)]
    assert facts["depth"].iloc[3:].isna().all()
    # 1.0 falls in the last of the five bins, 0.1 in the first
    assert list(facts["depth_bin"].iloc[:3]) == [4, 0, 4]


def test_shares_and_wilson_intervals_by_slot_and_depth():
    kv2 = {**KV, "sample_id": "k2", "task_info": {"facts": [{"slot": 1, "depth": 0.95, "role": "gold"}]}}
    kv3 = {**KV, "sample_id": "k3", "task_info": {"facts": [{"slot": 1, "depth": 0.3, "role": "gold"}]}}
    rows = [("t", "joint", 1.0, 1.0, 1.0), ("k", "joint", 2.0, 1.0, 1.0), ("k2", "joint", 3.0, 0.0, 1.0),
            ("k3", "joint", 4.0, 0.0, 0.0), ("t", "independent", 5.0, 0.0, 0.0), ("k", "independent", 6.0, 0.0, 1.0),
            ("k2", "independent", 7.0, 1.0, 1.0), ("k3", "independent", 8.0, 0.0, 0.0)]
    out = gold_position.tables(_run([TWOHOP, KV, kv2, kv3], rows, confidence=0.9))
    slot = out[gold_position.SLOT_TABLE].set_index(["condition", "role", "slot"])
    gold = slot.loc[("joint", "gold", 1)]
    assert gold["n"] == 3 and gold["em"] == pytest.approx(1 / 3) and gold["contains"] == pytest.approx(2 / 3)
    low, high = proportion_confint(1, 3, alpha=0.1, method="wilson")
    assert (gold["em_ci_low"], gold["em_ci_high"]) == pytest.approx((low, high))
    assert gold["mean_nll"] == pytest.approx(3.0)
    # the two-hop sample counts in both of its gold documents, with its one answer
    assert slot.loc[("joint", "hop1", 2), "em"] == slot.loc[("joint", "hop2", 0), "em"] == 1.0
    assert slot.loc[("independent", "hop1", 2), "n"] == 1
    # the run's condition order, then role and slot
    assert list(out[gold_position.SLOT_TABLE]["condition"]) == ["joint"] * 3 + ["independent"] * 3
    depth = out[gold_position.DEPTH_TABLE].set_index(["condition", "role", "depth_bin"])
    assert depth.loc[("joint", "gold", 4), "n"] == 2 and depth.loc[("joint", "gold", 4), "em"] == 0.5
    assert depth.loc[("joint", "gold", 1), "n"] == 1 and depth.loc[("joint", "gold", 1), "depth_low"] == 0.2
    assert depth.loc[("independent", "gold", 4), "em"] == 0.5


def test_a_run_without_answers_has_counts_and_nll_but_no_accuracy():
    run = _run([KV], [("k", "joint", 2.0, 0.0, 0.0)])
    run = AnalysisInput(**{**run.__dict__, "scores": run.scores[["sample_id", "condition", "nll"]]})
    table = gold_position.tables(run)[gold_position.SLOT_TABLE]
    assert table["n"].tolist() == [1] and table["em"].isna().all() and table["mean_nll"].tolist() == [2.0]


def test_samples_without_fact_positions_have_slot_rows_and_an_empty_depth_table():
    out = gold_position.tables(_run([HOTPOT], [("h", "joint", 1.0, 1.0, 0.0)]))
    slot = out[gold_position.SLOT_TABLE]
    assert list(zip(slot["role"], slot["slot"], slot["n"], slot["em"], strict=True)) == [("evidence1", 3, 1, 1.0),
                                                                            ("evidence2", 1, 1, 1.0)]
    depth = out[gold_position.DEPTH_TABLE]
    assert len(depth) == 0 and {"condition", "role", "depth_bin", "n", "em"} <= set(depth.columns)


# ------------------------------------------------------------ a tiny-model run


def _overrides(tmp):
    # condition=multidoc/joint: the joint condition and the baseline (independent), no surrogates to generate
    return ["experiment=multidoc", "model=tiny_random_llama", "dataset=synthetic_twohop", "dataset.n_samples=8",
            "condition=multidoc/joint", "stats.n_boot=1000", "progress=false", "answer.max_new_tokens=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from kvprime.config.compose import compose
    from kvprime.files.results_io import read_jsonl, write_atomic
    from kvprime.pipeline import runner
    from kvprime.reporting.finalize import finalize

    tmp = tmp_path_factory.mktemp("by_position")
    runner.run_experiment(compose(_overrides(tmp)), tmp / "run", only="multidoc/joint")
    # A random tiny model answers nothing right: give the answers known scores (a pattern by sample and
    # condition) and finalize again, so the shares are tested, not only the counts.
    lines = read_jsonl(tmp / "run" / "scores.jsonl")
    for i, row in enumerate(lines):
        row["exact_match"] = float(i % 3 == 0)
        row["contains"] = float(i % 2 == 0)
    write_atomic(tmp / "run" / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    finalize(tmp / "run")
    return tmp / "run"


def _expected(run_dir, key):
    """(condition, role, slot or depth bin) -> [n, EM hits, contains hits], counted from the run's files."""
    from kvprime.files.results_io import read_jsonl

    facts = {r["sample_id"]: [f for f in r["task_info"]["facts"] if f["role"] in ("hop1", "hop2")]
             for r in read_jsonl(run_dir / "inputs.jsonl")}
    counts = defaultdict(lambda: [0, 0, 0])
    for row in read_jsonl(run_dir / "scores.jsonl"):
        for f in facts[row["sample_id"]]:
            where = f["slot"] if key == "slot" else min(int(f["depth"] * 5), 4)
            c = counts[(row["condition"], f["role"], where)]
            c[0] += 1
            c[1] += row["exact_match"]
            c[2] += row["contains"]
    return dict(counts)


@pytest.mark.parametrize("table, key", [("accuracy_by_slot", "slot"), ("accuracy_by_depth", "depth_bin")])
def test_the_run_writes_the_tables_with_the_counts_of_its_files(run_dir, table, key):
    frame = pd.read_csv(run_dir / "analyses" / f"{table}.csv")
    got = {(r.condition, r.role, getattr(r, key)): [r.n, round(r.em * r.n), round(r.contains * r.n)]
           for r in frame.itertuples()}
    expected = _expected(run_dir, "slot" if key == "slot" else "depth")
    assert got == expected
    # every sample counted once per hop, in each condition
    assert frame.groupby(["condition", "role"])["n"].sum().tolist() == [8] * 4


def test_the_run_draws_the_figure_and_reports_accuracy_with_mcnemar(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert results["figures"]["accuracy_by_position"] == "accuracy_by_position.png"
    assert (run_dir / "accuracy_by_position.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "![accuracy_by_position](accuracy_by_position.png)" in report
    assert gold_position.TITLES["accuracy_by_slot"] in report
    # accuracy per condition with McNemar's test: the answer-quality section
    summary = {r["condition"]: r for r in results["answer_quality"]["summary"]}
    scores = pd.read_csv(run_dir / "scores.csv")
    assert summary["joint"]["em"] == pytest.approx(scores[scores.condition == "joint"]["exact_match"].mean())
    assert summary["joint"]["p_mcnemar"] is not None and "p_mcnemar" in report
