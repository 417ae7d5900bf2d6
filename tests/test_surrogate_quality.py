"""The surrogate-quality table and its warnings, on hand-made texts."""

import math

import pytest

from kvprime.surrogates.quality import (
    COLUMNS,
    degenerate_warnings,
    is_copied,
    is_question,
    longest_verbatim_run,
    quality_table,
    rows_from_run,
)

DOC = ("Super Bowl 50 was an American football game to determine the champion of the National Football League "
       "for the 2015 season. The Denver Broncos defeated the Carolina Panthers 24-10.")
DOC2 = "Oxygen is a chemical element with symbol O and atomic number 8. It is a highly reactive nonmetal."


def test_longest_verbatim_run_counts_words_case_and_punctuation_blind():
    assert longest_verbatim_run("the CHAMPION of the National Football League?", DOC) == 7
    assert longest_verbatim_run("Who won?", DOC) == 0
    assert longest_verbatim_run("", DOC) == 0


@pytest.mark.parametrize("text, copied", [
    # 8+ consecutive words of the document: copied, whatever else surrounds them.
    ("Super Bowl 50 was an American football game to determine who won", True),
    # 7 words covering 7/9 = 78% of the surrogate: copied (>= 5 words and >= 60%).
    ("the champion of the National Football League question", True),
    # 6 words covering 6/13 = 46%: not copied.
    ("which team became champion of the National Football League in the final game", False),
    # Short keyword queries reuse document terms: 4 words are under the 5-word floor.
    ("super bowl 50 winner", False),
    ("Denver Broncos Carolina Panthers", False),
    ("Who won Super Bowl 50?", False),
])
def test_copied_rule(text, copied):
    assert is_copied(text, DOC) is copied


@pytest.mark.parametrize("text, question", [
    ("Who won Super Bowl 50?", True),
    ('"Which team won the 2015 season?"', True),  # closing quote after the "?"
    ("how to fix a leaking tap", True),  # opens with an interrogative
    ("Is oxygen reactive", True),
    ("super bowl 50 winner", False),
    ("Super Bowl 50 was an American football game.", False),
    ("", False),
])
def test_question_rule(text, question):
    assert is_question(text) is question


def _row(sid, cond, source, text, doc=DOC, sim=None):
    return {"sample_id": sid, "condition": cond, "source": source, "surrogate": text, "document": doc,
            "query": "Who won Super Bowl 50?", "similarity": sim}


def test_quality_table_columns_and_shares():
    copy = "Super Bowl 50 was an American football game to determine the champion"
    rows = [
        _row("a", "gen_tq", "generated:target_question", "Who won Super Bowl 50?", sim=0.8),
        _row("b", "gen_tq", "generated:target_question", copy, sim=0.4),
        _row("a", "gen_kw", "generated:keyword_query", "super bowl 50 winner", sim=0.6),
        _row("b", "gen_kw", "generated:keyword_query", "  SUPER bowl 50 was an American football game to "
             "determine the   champion", sim=None),  # the same text as b's target_question, case and spaces aside
        _row("a", "static", "static:factual", "What are the key facts I need to know?"),
        _row("a", "other_tq", "generated_other:target_question", "What is oxygen?", doc=DOC),
    ]
    t = quality_table(rows)
    assert list(t.columns) == COLUMNS
    assert list(t.condition) == ["gen_tq", "gen_kw", "other_tq"]  # static rows are not generated
    tq, kw, other = (t.set_index("condition").loc[c] for c in ("gen_tq", "gen_kw", "other_tq"))
    assert tq.template == "target_question" and tq.kind == "generated" and other.kind == "generated_other"
    assert tq.n == 2
    assert tq.copied_share == 0.5 and kw.copied_share == 0.5
    assert tq.identical_across_templates_share == 0.5 and kw.identical_across_templates_share == 0.5
    assert tq.question_share == 0.5 and kw.question_share == 0.0
    assert tq.mean_words == (5 + 12) / 2
    assert tq.mean_similarity_to_query == pytest.approx(0.6) and kw.mean_similarity_to_query == pytest.approx(0.6)
    # generated_other rows are compared with other generated_other templates only: none here.
    assert math.isnan(other.identical_across_templates_share) and math.isnan(other.mean_similarity_to_query)
    assert other.question_share == 1.0 and other.copied_share == 0.0


def test_single_template_has_no_identical_share_and_empty_input_gives_empty_table():
    t = quality_table([_row("a", "C2", "generated:exp01", "Who won?"), _row("a", "B1", "generated:exp01", "Who won?")])
    assert t.identical_across_templates_share.isna().all()  # B1 and C2 share the template: not "another" one
    empty = quality_table([_row("a", "A1", "none", None)])
    assert list(empty.columns) == COLUMNS and empty.empty


def test_degenerate_warnings():
    first = "Super Bowl 50 was an American football game to determine the champion."
    rows = []
    for sid, doc in (("a", DOC), ("b", DOC), ("c", DOC2)):
        lead = first if doc == DOC else "Oxygen is a chemical element with symbol O and atomic number 8."
        rows += [_row(sid, "gen_tq", "generated:target_question", lead, doc=doc),
                 _row(sid, "gen_kw", "generated:keyword_query", lead, doc=doc)]
    rows += [_row(s, "gen_sy", "generated:symptom_scenario", "x", doc=DOC) for s in "abc"]
    warnings = degenerate_warnings(quality_table(rows))
    text = "\n".join(warnings)
    assert "gen_tq (target_question, 3 surrogates): 100% of the surrogates copy" in text
    assert "gen_kw (keyword_query, 3 surrogates): 100% of the surrogates are identical" in text
    assert "gen_tq (target_question, 3 surrogates): only 0% of the surrogates read as a question" in text
    assert not any("gen_kw" in w and "question" in w for w in warnings)  # keyword queries need not be questions
    assert any(w.startswith("gen_sy") and "1.0 words on average" in w for w in warnings)
    # A generated_other condition repeats another condition's texts: no warnings of its own.
    rows = [{**r, "condition": "other_" + r["condition"],
             "source": r["source"].replace("generated:", "generated_other:")} for r in rows]
    assert degenerate_warnings(quality_table(rows)) == []

    good = [_row(s, "gen_tq", "generated:target_question", q) for s, q in
            (("a", "Who won Super Bowl 50?"), ("b", "Which teams played in 2015?"))]
    assert degenerate_warnings(quality_table(good)) == []


def test_rows_from_run_files():
    inputs = [{"sample_id": "a", "passage": DOC, "query": "q?", "surrogates": {"A1": None, "C2": "Who won?"},
               "similarity": {"C2": 0.5}}]
    conditions = {"A1": {"surrogate": "none"}, "C2": {"surrogate": "generated:exp01"}}
    rows = rows_from_run(inputs, conditions)
    assert rows[1] == {"sample_id": "a", "condition": "C2", "source": "generated:exp01", "surrogate": "Who won?",
                       "document": DOC, "query": "q?", "similarity": 0.5}
    assert quality_table(rows).condition.tolist() == ["C2"]
