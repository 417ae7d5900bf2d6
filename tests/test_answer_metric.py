"""metrics=[nll,answer] in a run: the answer fields in each score line, EM/contains/F1 beside NLL in the tables and the
report, NLL untouched by decoding, and a killed run resumed to the same lines."""

import json

import pandas as pd
import pytest
from fixtures.jsonl import write_jsonl

from kvprime.analysis import answer_quality as aq
from kvprime.config.compose import compose
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner

EXP21 = ["bare", "full_oracle", "full_oracle_repeat", "truncated_oracle", "truncated_random"]
ANSWER = ["metrics=[nll,answer]", "answer.max_new_tokens=5"]


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory):
    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the city of France and into the sea. "
                                       f"It is known for the tower {i}.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}", "answers": ["the sea"]}
            for i in range(5)]
    path = tmp_path_factory.mktemp("answer_data") / "samples.jsonl"
    write_jsonl(path, rows)
    return path


def cfg(samples_file, *extra):
    return compose(["model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}", "stats.n_boot=1000",
                    "progress=false", *extra])


@pytest.fixture(scope="module")
def answer_run(samples_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("answer_run") / "run"
    runner.run_experiment(cfg(samples_file, *ANSWER), out)
    return out


def test_every_score_line_has_its_answer_scored_against_every_reference(answer_run):
    inputs = {r["sample_id"]: r for r in read_jsonl(answer_run / "inputs.jsonl")}
    rows = read_jsonl(answer_run / "scores.jsonl")
    assert len(rows) == 5 * len(EXP21) and len({(r["sample_id"], r["condition"]) for r in rows}) == len(rows)
    for r in rows:
        refs = inputs[r["sample_id"]]["answers"]
        assert len(refs) == 2  # the scored answer and the extra reference
        assert r["exact_match"] == aq.exact_match(r["generated_answer"], refs)
        assert r["f1"] == aq.f1(r["generated_answer"], refs)
        assert r["contains"] == aq.contains(r["generated_answer"], refs)
        n, stop = r["generated_answer_tokens"], r["answer_stop"]
        assert stop in ("newline", "eos", "max_new_tokens")
        # the end token is not kept, so an answer it ends has at most max_new_tokens - 1 tokens
        assert n == 5 if stop == "max_new_tokens" else (n <= 4 if stop == "eos" else 1 <= n <= 5)
        assert "\n" not in r["generated_answer"] and r["answer_s"] >= 0
    assert len({r["generated_answer"] for r in rows}) > 1
    scores_csv = pd.read_csv(answer_run / "scores.csv")
    assert {"generated_answer", "exact_match", "f1", "contains", "answer_stop"} <= set(scores_csv.columns)
    assert list(scores_csv["contains"]) == [r["contains"] for r in rows]


def test_answer_statistics_sit_beside_nll_in_summary_comparisons_and_report(answer_run):
    rows = pd.DataFrame(read_jsonl(answer_run / "scores.jsonl"))
    wide = rows.pivot(index="sample_id", columns="condition", values="f1")
    summary = pd.read_csv(answer_run / "summary.csv").set_index("condition")
    assert list(summary.index) == EXP21
    for c in EXP21[1:]:
        assert summary.loc[c, "f1_delta"] == pytest.approx((wide[c] - wide["bare"]).mean(), abs=1e-12)
        assert summary.loc[c, "f1"] == pytest.approx(wide[c].mean(), abs=1e-12)
        assert summary.loc[c, "n_answers"] == 5
    held = rows.pivot(index="sample_id", columns="condition", values="contains")
    for c in EXP21:
        assert summary.loc[c, "contains"] == pytest.approx(held[c].mean(), abs=1e-12)
    for c in EXP21[1:]:
        assert summary.loc[c, "contains_delta"] == pytest.approx((held[c] - held["bare"]).mean(), abs=1e-12)
        assert summary.loc[c, "contains_gained"] == ((held[c] == 1) & (held["bare"] == 0)).sum()
        assert summary.loc[c, "contains_lost"] == ((held[c] == 0) & (held["bare"] == 1)).sum()
    assert {"p_mcnemar_contains", "p_mcnemar_contains_holm"} <= set(summary.columns)
    assert pd.isna(summary.loc["bare", "f1_delta"])
    comp = pd.read_csv(answer_run / "comparisons.csv").set_index("name")
    d_vs_e = comp.loc["D vs E: is there a semantic signal?"]
    assert d_vs_e.f1_delta == pytest.approx((wide["truncated_oracle"] - wide["truncated_random"]).mean(), abs=1e-12)
    assert "mean_delta" in comp.columns and "p_mcnemar" in comp.columns and "p_mcnemar_contains" in comp.columns
    report = (answer_run / "report.md").read_text()
    assert "## Answer quality: exact match, contains and F1" in report and aq.NORMALISATION in report
    assert "contains_gained" in report and "instruct models answer in sentences" in report
    assert "![answer_quality](answer_quality.png)" in report
    # What decoding cost is counted beside the rest (costs.csv, the report's cost table).
    costs = pd.read_csv(answer_run / "costs.csv")
    costs = costs[costs.test == costs.treatment + f" vs {EXP21[0]}"].set_index("treatment")
    decoded = rows.groupby("condition")["generated_answer_tokens"].mean()
    for c in EXP21[1:]:
        assert costs.loc[c, "answer_tokens"] == pytest.approx(decoded[c])
        assert costs.loc[c, "answer_gflop"] > 0 and costs.loc[c, "answer_s"] > 0
    assert "answer_gflop" in (answer_run / "report.md").read_text()
    assert (answer_run / "answer_quality.png").stat().st_size > 0
    results = json.loads((answer_run / "results.json").read_text())
    assert results["answer_quality"]["max_new_tokens"] == 5
    assert "p_mcnemar_contains_holm" in results["answer_quality"]["summary"][1]
    assert sum(sum(v for k, v in s.items() if k != "condition") for s in results["answer_quality"]["stops"]) == 25


@pytest.mark.figures
def test_the_report_command_rebuilds_the_answer_tables_byte_for_byte(answer_run):
    from kvprime.reporting.finalize import finalize

    names = ["summary.csv", "comparisons.csv", "report.md", "answer_quality.png", "scores.csv"]
    before = {n: (answer_run / n).read_bytes() for n in names}
    finalize(answer_run)
    assert {n: (answer_run / n).read_bytes() for n in names} == before


def test_score_lines_written_before_contains_existed_still_report(answer_run, tmp_path):
    import shutil

    from kvprime.reporting.finalize import finalize

    old = tmp_path / "old_scores"
    shutil.copytree(answer_run, old)
    lines = [{k: v for k, v in r.items() if k != "contains"} for r in read_jsonl(old / "scores.jsonl")]
    write_jsonl(old / "scores.jsonl", lines)
    finalize(old)
    new, was = pd.read_csv(answer_run / "summary.csv"), pd.read_csv(old / "summary.csv")
    contains_cols = [c for c in new.columns if "contains" in c]
    assert len(contains_cols) == 6 and was[contains_cols].isna().all().all()  # missing, not zero
    pd.testing.assert_frame_equal(was.drop(columns=contains_cols), new.drop(columns=contains_cols))
    assert "contains" not in pd.read_csv(old / "scores.csv").columns


def test_decoding_changes_no_nll_and_batching_changes_no_answer(answer_run, samples_file, tmp_path):
    plain = tmp_path / "plain"
    runner.run_experiment(cfg(samples_file), plain)
    a = pd.DataFrame(read_jsonl(answer_run / "scores.jsonl")).set_index(["sample_id", "condition"]).sort_index()
    b = pd.DataFrame(read_jsonl(plain / "scores.jsonl")).set_index(["sample_id", "condition"]).sort_index()
    assert "generated_answer" not in b and "em" not in pd.read_csv(plain / "summary.csv")
    assert (a["nll"] == b["nll"]).all()  # the same batches: bit for bit
    # One sample per chunk and tiny scoring batches: every answer decoded in other batches, the same text.
    small = tmp_path / "small"
    runner.run_experiment(cfg(samples_file, *ANSWER, "batch.samples=1", "batch.score_tokens=64"), small)
    c = pd.DataFrame(read_jsonl(small / "scores.jsonl")).set_index(["sample_id", "condition"]).sort_index()
    assert (a["generated_answer"] == c["generated_answer"]).all()
    assert (a["answer_stop"] == c["answer_stop"]).all()


def test_a_run_killed_while_decoding_resumes_to_the_same_lines(answer_run, samples_file, tmp_path, monkeypatch):
    from kvprime.cache import answers

    real, calls = answers.decode_many, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt  # killed while decoding the second chunk's answers
        return real(*a, **k)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(answers, "decode_many", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(cfg(samples_file, *ANSWER), crashed)
    monkeypatch.setattr(answers, "decode_many", real)
    partial = read_jsonl(crashed / "scores.jsonl")
    assert len(partial) == 2 * len(EXP21) and all("generated_answer" in r for r in partial)

    with pytest.raises(runner.RunError, match=r"metrics"):  # the answer metric cannot be switched off on resume
        runner.run_experiment(cfg(samples_file, "resume=true"), crashed)
    runner.run_experiment(cfg(samples_file, *ANSWER, "resume=true"), crashed)
    cols = ["sample_id", "condition", "nll", "generated_answer", "exact_match", "f1", "answer_stop"]
    a = pd.read_csv(answer_run / "scores.csv")[cols].sort_values(cols[:2]).reset_index(drop=True)
    b = pd.read_csv(crashed / "scores.csv")[cols].sort_values(cols[:2]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert (answer_run / "summary.csv").read_text() == (crashed / "summary.csv").read_text()


def test_a_run_started_before_the_answer_metric_resumes(samples_file, tmp_path):
    out = tmp_path / "old"
    runner.run_experiment(cfg(samples_file), out)
    stored = json.loads((out / "config.json").read_text())
    # As a run written before these settings existed (answer metric, multidoc, group_by_passage).
    del stored["metrics"], stored["answer"], stored["multidoc"], stored["dataset"]["group_by_passage"]
    (out / "config.json").write_text(json.dumps(stored))
    runner.run_experiment(cfg(samples_file, "resume=true"), out)
    with pytest.raises(runner.RunError, match=r"\['answer', 'metrics'\]"):
        runner.run_experiment(cfg(samples_file, *ANSWER, "resume=true"), out)
