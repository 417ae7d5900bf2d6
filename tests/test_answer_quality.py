"""SQuAD exact match, F1 and contains, and their paired statistics (McNemar's exact test for EM and contains, the
run's paired tests for F1)."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from kvprime.analysis import answer_quality as aq
from kvprime.analysis import stats


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower.", "eiffel tower"),
    ("an apple, a pear and THE plum", "apple pear and plum"),
    ("theatre  Anthem\tthere", "theatre anthem there"),  # articles only as whole words
    ("Denver-Broncos", "denverbroncos"),  # the official script drops punctuation without a space
    ("  ", ""),
])
def test_normalisation_is_squads(text, expected):
    assert aq.normalize(text) == expected


def test_exact_match_and_f1_take_the_best_reference():
    assert aq.exact_match("the Denver Broncos.", ["Carolina Panthers", "Denver Broncos"]) == 1.0
    assert aq.exact_match("Denver Broncos won", ["Denver Broncos"]) == 0.0
    # pred {denver, broncos, won}, ref {denver, broncos}: precision 2/3, recall 1 -> F1 0.8
    assert aq.f1("Denver Broncos won", ["Paris", "the Denver Broncos"]) == pytest.approx(0.8, abs=1e-15)
    # multisets: "x x y" against "x y" shares two tokens, not three
    assert aq.f1("x x y", "x y") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1), abs=1e-15)
    assert aq.f1("", ["Paris"]) == 0.0 and aq.exact_match("", ["Paris"]) == 0.0
    assert aq.score_fields("Paris.", ("paris", "Lyon")) == {"generated_answer": "Paris.", "exact_match": 1.0,
                                                           "f1": 1.0, "contains": 1.0}
    sentence = aq.score_fields("It is Paris.", ["Paris"])
    assert (sentence["exact_match"], sentence["contains"]) == (0.0, 1.0)  # what EM misses in a sentence
    with pytest.raises(ValueError):
        aq.f1("x", [])


@pytest.mark.parametrize("prediction, references, expected", [
    ("The very first plugs-out test occurred on January 27, 1967.", ["January 27, 1967"], 1.0),
    ("The test was on January 27, 1967.", "January 27, 1967", 1.0),
    ("in 19670", ["1967"], 0.0),  # whole tokens only: 19670 is not 1967
    ("in 1967", ["1967"], 1.0),
    ("theatre", ["the"], 0.0),  # "the" normalises to nothing: an empty reference matches nothing
    ("Denver broncos", ["broncos denver"], 0.0),  # contiguous and in order
    ("He played for THE Denver Broncos!", ["denver broncos."], 1.0),  # case, articles and punctuation normalised
    ("The Broncos, of Denver.", ["Denver Broncos"], 0.0),
    ("anything at all", ["", "  "], 0.0),  # empty references are ignored, not matched everywhere
    ("", ["Paris"], 0.0),
    ("It rained in Lyon.", ["Paris", "Lyon", "Nice"], 1.0),  # any reference
    ("It rained in Lyon.", ["Paris", "Nice"], 0.0),
    ("Denver Broncos", ["Denver Broncos won"], 0.0),  # a reference longer than the answer
])
def test_contains_matches_a_normalised_reference_on_whole_tokens(prediction, references, expected):
    assert aq.contains(prediction, references) == expected


def test_contains_needs_a_reference():
    with pytest.raises(ValueError):
        aq.contains("x", [])


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ref, trt = rng.random(40) < 0.5, rng.random(40) < rng.random()
        out = aq.mcnemar_exact(ref.astype(float), trt.astype(float))
        gained = sum(1 for r, t in zip(ref, trt, strict=True) if t and not r)
        lost = sum(1 for r, t in zip(ref, trt, strict=True) if r and not t)
        assert (out["em_gained"], out["em_lost"]) == (gained, lost)
        assert out["p_mcnemar"] == pytest.approx(st.binomtest(gained, gained + lost, 0.5).pvalue, rel=1e-12)
    assert np.isnan(aq.mcnemar_exact([1, 0, 1], [1, 0, 1])["p_mcnemar"])  # no discordant pair: no test


def _answers(seed=1, n=30):
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    rows = []
    for cond, shift in (("A", 0.0), ("B", 0.3), ("C", -0.2)):
        f = np.clip(base + shift + 0.1 * rng.standard_normal(n), 0, 1)
        em = (f > 0.7).astype(float)
        rows += [{"sample_id": f"s{i:02d}", "condition": cond, "exact_match": em[i], "f1": f[i]} for i in range(n)]
    return pd.DataFrame(rows)


def test_summary_pairs_by_sample_and_counts_a_better_answer_as_positive():
    frame = _answers()
    comps = [{"name": "B vs C", "treatment": "B", "reference": "C"}, {"name": "B vs A", "treatment": "B",
                                                                      "reference": "A"}]
    summary, comp = aq.summarize(frame, baseline="A", conditions=["A", "B", "C"], comparisons=comps, n_boot=1000,
                                 seed=5)
    wide = frame.pivot(index="sample_id", columns="condition")
    s = summary.set_index("condition")
    assert s.loc["A", "em"] == pytest.approx(wide["exact_match"]["A"].mean())
    assert np.isnan(s.loc["A", "f1_delta"])  # the baseline is not tested against itself
    for cond in ("B", "C"):
        d = wide["f1"][cond] - wide["f1"]["A"]
        assert s.loc[cond, "f1_delta"] == pytest.approx(d.mean(), abs=1e-12)
        assert s.loc[cond, "em_delta"] == pytest.approx((wide["exact_match"][cond] - wide["exact_match"]["A"]).mean())
        ref = stats.paired_test(wide["f1"][cond], wide["f1"]["A"], n_boot=1000,
                                seed=stats._derive_seed(5, f"f1: {cond} vs A"))
        assert (s.loc[cond, "f1_ci_low"], s.loc[cond, "f1_ci_high"]) == (ref["ci_low"], ref["ci_high"])
        assert s.loc[cond, "f1_p_ttest"] == ref["p_ttest"]
    assert s.loc["B", "f1_delta"] > 0 > s.loc["C", "f1_delta"]
    assert s.loc["B", "em_gained"] > s.loc["B", "em_lost"]
    # One Holm family per metric over the distinct tests: B-A (also a named comparison, counted once), C-A, B-C.
    c = comp.set_index("name")
    raw = [s.loc["B", "p_mcnemar"], s.loc["C", "p_mcnemar"], c.loc["B vs C", "p_mcnemar"]]
    assert [s.loc["B", "p_mcnemar_holm"], s.loc["C", "p_mcnemar_holm"], c.loc["B vs C", "p_mcnemar_holm"]] == \
        pytest.approx(list(stats.holm(raw)))
    assert c.loc["B vs A", "f1_p_holm"] == s.loc["B", "f1_p_holm"]
    assert c.loc["B vs C", "f1_delta"] == pytest.approx((wide["f1"]["B"] - wide["f1"]["C"]).mean(), abs=1e-12)


def _contains_answers():
    # Hand-made: EM is 0 everywhere (sentences), contains tells the conditions apart.
    values = {"A": [0, 0, 0, 0, 0, 1, 1, 0], "B": [1, 1, 1, 1, 1, 1, 1, 0], "C": [0, 0, 0, 0, 0, 0, 0, 0]}
    return pd.DataFrame([{"sample_id": f"s{i}", "condition": c, "exact_match": 0.0, "f1": 0.1 * v[i] + 0.01 * i,
                          "contains": float(v[i])} for c, v in values.items() for i in range(8)])


def test_contains_is_tested_like_exact_match_with_its_own_holm_family():
    summary, comp = aq.summarize(_contains_answers(), baseline="A", conditions=["A", "B", "C"],
                                 comparisons=[{"name": "B vs C", "treatment": "B", "reference": "C"}], n_boot=1000)
    s, c = summary.set_index("condition"), comp.set_index("name")
    assert list(s["contains"]) == [2 / 8, 7 / 8, 0.0]
    # B vs A: gained s0-s4 (5), lost none: two-sided binomial p = 2 * 0.5**5. C vs A: lost s5, s6: p = 2 * 0.5**2.
    assert (s.loc["B", "contains_gained"], s.loc["B", "contains_lost"]) == (5, 0)
    assert (s.loc["C", "contains_gained"], s.loc["C", "contains_lost"]) == (0, 2)
    assert s.loc["B", "contains_delta"] == pytest.approx(5 / 8)
    assert s.loc["C", "contains_delta"] == pytest.approx(-2 / 8)
    assert s.loc["B", "p_mcnemar_contains"] == pytest.approx(0.0625)
    assert s.loc["C", "p_mcnemar_contains"] == pytest.approx(0.5)
    # B vs C: gained 7, lost 0: p = 2 * 0.5**7. Holm over {0.0625, 0.5, 1/64}: 3/64, 0.0625 * 2, 0.5.
    assert (c.loc["B vs C", "contains_gained"], c.loc["B vs C", "contains_lost"]) == (7, 0)
    assert c.loc["B vs C", "p_mcnemar_contains_holm"] == pytest.approx(3 / 64)
    assert s.loc["B", "p_mcnemar_contains_holm"] == pytest.approx(0.125)
    assert s.loc["C", "p_mcnemar_contains_holm"] == pytest.approx(0.5)
    # EM has no discordant pair: its own family stays untested, whatever contains found.
    assert s.loc["B", "em_gained"] == s.loc["B", "em_lost"] == 0 and np.isnan(s.loc["B", "p_mcnemar_holm"])
    assert list(summary.columns) == ["condition", *aq.SUMMARY_FIELDS]
    assert list(comp.columns) == ["name", *aq.COMPARISON_FIELDS]


def test_scores_written_before_contains_existed_leave_it_missing():
    old = _contains_answers().drop(columns="contains")
    answers = aq.frame(old)
    assert answers["contains"].isna().all()
    summary, _ = aq.summarize(answers, baseline="A", conditions=["A", "B", "C"], n_boot=1000)
    s = summary.set_index("condition")
    for col in ("contains", "contains_delta", "contains_gained", "contains_lost", "p_mcnemar_contains",
                "p_mcnemar_contains_holm"):
        assert s[col].isna().all(), col
    assert (s.loc["B", "n_answers"], s.loc["B", "em_delta"]) == (8, 0.0)  # EM and F1 are still tested
    assert s.loc["B", "f1_delta"] == pytest.approx(0.1 * 5 / 8)
    # Old and new lines mixed (a resumed run): contains is paired on the samples that have it.
    mixed = _contains_answers()
    mixed.loc[mixed["sample_id"] == "s0", "contains"] = np.nan
    s = aq.summarize(mixed, baseline="A", conditions=["A", "B"], n_boot=1000)[0].set_index("condition")
    assert (s.loc["B", "contains_gained"], s.loc["B", "n_answers"]) == (4, 8)
    assert s.loc["B", "contains_delta"] == pytest.approx(4 / 7)


def test_a_routed_condition_takes_the_answer_of_the_cache_it_chose():
    scores = _answers(n=4)
    derived = pd.DataFrame({"sample_id": ["s00", "s01", "s02"], "condition": "R", "nll": 0.0,
                            "routed_to": ["B", "C", "A"]})
    out = aq.frame(scores, derived).set_index(["sample_id", "condition"])
    for sid, chosen in zip(derived.sample_id, derived.routed_to, strict=True):
        assert out.loc[(sid, "R"), "f1"] == out.loc[(sid, chosen), "f1"]
        assert np.isnan(out.loc[(sid, "R"), "contains"])  # these scores have no contains: missing, routed or not
    scores = _contains_answers()
    derived = pd.DataFrame({"sample_id": ["s0", "s5"], "condition": "R", "nll": 0.0, "routed_to": ["B", "C"]})
    out = aq.frame(scores, derived).set_index(["sample_id", "condition"])
    assert (out.loc[("s0", "R"), "contains"], out.loc[("s5", "R"), "contains"]) == (1.0, 0.0)
    assert ("s03", "R") not in out.index
