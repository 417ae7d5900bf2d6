import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from kvprime.analysis.stats import describe, holm, paired_test, summarize, verdict

NB = 2000  # enough resamples for stable CIs, small enough to keep the suite fast


# ---------------------------------------------------------------- describe
def test_describe_excludes_and_counts_nonfinite():
    d = describe([1.0, 2.0, np.nan, 4.0, np.inf, 3.0])
    v = np.array([1.0, 2.0, 4.0, 3.0])
    assert d["n"] == 4 and d["n_nonfinite"] == 2
    assert d["mean"] == pytest.approx(2.5)
    assert d["std"] == pytest.approx(np.std(v, ddof=1)) == pytest.approx(1.2909944487358056)
    assert d["sem"] == pytest.approx(1.2909944487358056 / 2)
    assert d["median"] == pytest.approx(2.5)


# ---------------------------------------------------------------- paired_test
REF = np.array([2.31, 1.87, 3.02, 2.50, 1.95, 2.76, 3.40, 2.05, 2.64, 1.72])
TRT = np.array([2.10, 1.90, 2.71, 2.22, 1.80, 2.81, 3.01, 1.77, 2.60, 1.69])


def test_paired_matches_scipy():
    r = paired_test(REF, TRT, n_boot=NB)
    t = st.ttest_rel(REF, TRT)
    w = st.wilcoxon(REF - TRT)
    assert r["n"] == 10 and r["n_dropped_nonfinite"] == 0
    assert r["t_stat"] == pytest.approx(t.statistic) and r["p_ttest"] == pytest.approx(t.pvalue)
    assert r["w_stat"] == pytest.approx(w.statistic) and r["p_wilcoxon"] == pytest.approx(w.pvalue)
    assert r["std_delta"] == pytest.approx(np.std(REF - TRT, ddof=1))
    assert r["sem_delta"] == pytest.approx(r["std_delta"] / math.sqrt(10))
    json.dumps(r)  # plain Python types only
    assert all(type(r[k]) is float for k in ("mean_delta", "p_ttest", "ci_low", "d_z"))
    assert type(r["n"]) is int


def test_d_z_hand_value_and_sign_convention():
    # treatment NLL lower by 1,2,3,4 -> deltas [1,2,3,4], mean 2.5, sd(ddof=1) 1.2909944...
    r = paired_test([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 4.0], n_boot=NB)
    assert r["mean_delta"] == pytest.approx(2.5)
    assert r["d_z"] == pytest.approx(1.9364916731, abs=1e-9)
    assert r["win_rate"] == 1.0 and r["t_stat"] > 0
    flipped = paired_test([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0], n_boot=NB)
    assert flipped["mean_delta"] == pytest.approx(-2.5) and flipped["loss_rate"] == 1.0


def test_win_tie_loss_rates_hand_counted():
    # deltas = [1, 0, -1, 0, 2]: 2 wins, 2 ties, 1 loss
    r = paired_test([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 2.0, 4.0, 4.0, 3.0], n_boot=NB)
    assert (r["win_rate"], r["tie_rate"], r["loss_rate"]) == (0.4, 0.4, 0.2)


def test_bootstrap_ci_contains_mean_and_is_seeded():
    a = paired_test(REF, TRT, n_boot=NB, seed=1)
    b = paired_test(REF, TRT, n_boot=NB, seed=1)
    c = paired_test(REF, TRT, n_boot=NB, seed=2)
    assert a["ci_method"] == "BCa"
    assert a["ci_low"] < a["mean_delta"] < a["ci_high"]
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])
    wide = paired_test(REF, TRT, n_boot=NB, seed=1, confidence=0.99)
    assert wide["ci_low"] < a["ci_low"] and wide["ci_high"] > a["ci_high"]


def _no_warnings(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


def test_n1_all_stats_nan_no_warning():
    r = _no_warnings(paired_test, [2.0], [1.0], n_boot=NB)
    assert r["n"] == 1 and r["mean_delta"] == 1.0 and r["win_rate"] == 1.0
    for k in ("std_delta", "sem_delta", "ci_low", "ci_high", "t_stat", "p_ttest",
              "w_stat", "p_wilcoxon", "d_z"):
        assert math.isnan(r[k]), k
    empty = _no_warnings(paired_test, [], [], n_boot=NB)
    assert empty["n"] == 0 and math.isnan(empty["mean_delta"])


def test_all_zero_deltas():
    x = [1.0, 2.0, 3.0, 4.0]
    r = _no_warnings(paired_test, x, x, n_boot=NB)
    assert r["tie_rate"] == 1.0 and r["mean_delta"] == 0.0
    assert math.isnan(r["p_wilcoxon"]) and math.isnan(r["w_stat"]) and math.isnan(r["d_z"])
    assert verdict(r["mean_delta"], r["p_ttest"]) == "inconclusive"
    # identical conditions: the mean delta is exactly 0, inside any margin -> equivalence is shown
    assert r["p_tost"] == 0.0 and verdict(r["mean_delta"], r["p_ttest"], 0.05, r["p_tost"]) == "equivalent"
    assert r["mde"] == 0.0 and math.isnan(r["p_sign"])
    # BCa is undefined on constant data; the percentile interval collapses to the constant
    assert r["ci_method"] == "percentile" and r["ci_low"] == r["ci_high"] == 0.0


def test_nonfinite_pairs_dropped_and_counted():
    r = _no_warnings(paired_test, [1.0, np.nan, 3.0, 4.0, np.inf, 5.0],
                     [0.0, 1.0, np.nan, 2.0, 1.0, 4.5], n_boot=NB)
    assert r["n"] == 3 and r["n_dropped_nonfinite"] == 3
    assert r["mean_delta"] == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert r["p_ttest"] == pytest.approx(st.ttest_rel([1.0, 4.0, 5.0], [0.0, 2.0, 4.5]).pvalue)


# ---------------------------------------------------------------- holm / verdict
def test_holm_hand_example():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_nan_not_counted_and_cap():
    out = holm([0.01, np.nan, 0.04])  # m = 2
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.04])
    np.testing.assert_allclose(holm([0.4, 0.9, 0.7]), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(holm([0.3, 0.01]), [0.3, 0.02])
    assert holm([]).size == 0


def test_verdict():
    assert verdict(0.3, 0.01) == "better"
    assert verdict(-0.3, 0.01) == "worse"
    assert verdict(0.3, 0.05) == "inconclusive"  # strict <
    assert verdict(0.3, float("nan")) == "inconclusive"
    assert verdict(0.3, 0.04, alpha=0.01) == "inconclusive"
    # equivalence shown: the effect is smaller than the margin, significant or not
    assert verdict(0.001, 0.5, 0.05, 0.01) == "equivalent"
    assert verdict(0.001, 0.001, 0.05, 0.01) == "equivalent"
    assert verdict(0.001, 0.5, 0.05, 0.05) == "inconclusive"  # strict <
    assert verdict(-0.3, 0.01, 0.05, float("nan")) == "worse"


# ---------------------------------------------------------------- summarize
A = [2.0, 2.5, 3.0, 1.5, 2.2, 2.8]
B_GAIN = [0.523, 0.371, 0.618, 0.292, 0.487, 0.446]      # B better than A everywhere
C_LOSS = [0.213, -0.094, 0.337, 0.251, 0.118]          # C mostly worse; s5 missing


def _scores():
    rows = [(f"s{i}", "A", a) for i, a in enumerate(A)]
    rows += [(f"s{i}", "B", a - g) for i, (a, g) in enumerate(zip(A, B_GAIN, strict=True))]
    rows += [(f"s{i}", "C", a + l) for i, (a, l) in enumerate(zip(A, C_LOSS, strict=False))]  # s5 has no C
    return pd.DataFrame(rows, columns=["sample_id", "condition", "nll"])


COMP = [{"name": "B vs C", "treatment": "B", "reference": "C"}]


def test_summarize_baseline_pairing_and_holm():
    summ, comp = summarize(_scores(), baseline="A", comparisons=COMP, n_boot=NB)
    assert list(summ["condition"]) == ["A", "B", "C"]
    base = summ.iloc[0]
    assert base["is_baseline"] and base["verdict"] == "baseline"
    assert math.isnan(base["mean_delta"]) and math.isnan(base["p_holm"]) and base["n"] == 6
    b, c = summ.iloc[1], summ.iloc[2]
    assert b["n_pairs"] == 6 and b["mean_delta"] == pytest.approx(np.mean(B_GAIN))
    assert c["n"] == 5 and c["n_pairs"] == 5
    assert c["mean_delta"] == pytest.approx(-np.mean(C_LOSS))
    a5 = np.array(A[:5])
    assert c["p_ttest"] == pytest.approx(st.ttest_rel(a5, a5 + C_LOSS).pvalue)
    # one Holm family: both baseline tests + the named comparison, each with its t-test and its TOST p
    rows = [b, c, comp.iloc[0]]
    family = [r["p_ttest"] for r in rows] + [r["p_tost"] for r in rows]
    np.testing.assert_allclose([r["p_holm"] for r in rows] + [r["p_tost_holm"] for r in rows], holm(family))
    assert b["verdict"] == "better"


def test_named_comparison_direction():
    _, comp = summarize(_scores(), baseline="A", comparisons=COMP, n_boot=NB)
    r = comp.iloc[0]
    assert (r["name"], r["treatment"], r["reference"]) == ("B vs C", "B", "C")
    # delta = C - B = loss + gain > 0 on the 5 shared samples -> B (treatment) better
    assert r["n"] == 5
    assert r["mean_delta"] == pytest.approx(np.mean(np.add(C_LOSS, B_GAIN[:5])))
    assert r["win_rate"] == 1.0 and r["verdict"] == "better"


def test_summarize_duplicate_raises():
    df = pd.concat([_scores(), pd.DataFrame([["s2", "B", 9.9]], columns=["sample_id", "condition", "nll"])])
    with pytest.raises(ValueError, match=r"s2.*B"):
        summarize(df, baseline="A", n_boot=NB)


def test_summarize_unknown_condition_lists_available():
    bad = [{"name": "X vs A", "treatment": "X", "reference": "A"}]
    with pytest.raises(ValueError, match=r"X.*available.*'A', 'B', 'C'"):
        summarize(_scores(), baseline="A", comparisons=bad, n_boot=NB)
    with pytest.raises(ValueError, match="available"):
        summarize(_scores(), baseline="Z", n_boot=NB)


def test_summarize_deterministic_and_row_order_invariant():
    s1, c1 = summarize(_scores(), baseline="A", comparisons=COMP, n_boot=NB, seed=3)
    s2, c2 = summarize(_scores(), baseline="A", comparisons=COMP, n_boot=NB, seed=3)
    pd.testing.assert_frame_equal(s1, s2)
    pd.testing.assert_frame_equal(c1, c2)
    shuffled = _scores().sample(frac=1.0, random_state=7)
    s3, c3 = summarize(shuffled, baseline="A", conditions=["A", "B", "C"], comparisons=COMP,
                       n_boot=NB, seed=3)
    pd.testing.assert_frame_equal(s1, s3)
    pd.testing.assert_frame_equal(c1, c3)
    # bootstrap seed is keyed by test name, not by position in the condition list
    s5, _ = summarize(_scores(), baseline="A", conditions=["A", "C", "B"], comparisons=COMP,
                      n_boot=NB, seed=3)
    pd.testing.assert_frame_equal(s5.set_index("condition").loc[["A", "B", "C"]].reset_index(), s1)
    s4, _ = summarize(_scores(), baseline="A", comparisons=COMP, n_boot=NB, seed=4)
    ci = ["ci_low", "ci_high"]
    assert not np.array_equal(s4.loc[1:, ci].to_numpy(), s1.loc[1:, ci].to_numpy())


def test_named_comparison_repeating_a_baseline_test_counts_once():
    rng = np.random.default_rng(3)
    base = rng.normal(3, 1, 12)
    rows = [{"sample_id": f"s{i}", "condition": c, "nll": v}
            for c, vals in {"A": base, "B": base - 0.3 + rng.normal(0, .2, 12),
                            "C": base + rng.normal(0, .2, 12)}.items() for i, v in enumerate(vals)]
    df = pd.DataFrame(rows)
    comps = [{"name": "B vs A", "treatment": "B", "reference": "A"}, {"name": "B vs C", "treatment": "B",
                                                                      "reference": "C"}]
    summary, comp = summarize(df, baseline="A", comparisons=comps, n_boot=500, seed=1)
    b = summary.set_index("condition").loc["B"]
    same = comp.set_index("name").loc["B vs A"]
    assert (b.ci_low, b.ci_high, b.p_holm) == (same.ci_low, same.ci_high, same.p_holm)
    # Family of 3 distinct tests (B-A, C-A, B-C), not 4, each with its t-test and TOST p: 6 p-values.
    c, bc = summary.set_index("condition").loc["C"], comp.set_index("name").loc["B vs C"]
    raw = {("A", "B"): b.p_ttest, ("A", "C"): c.p_ttest, ("C", "B"): bc.p_ttest,
           "tost AB": b.p_tost, "tost AC": c.p_tost, "tost CB": bc.p_tost}
    expected = dict(zip(raw, holm(list(raw.values())), strict=True))
    assert b.p_holm == pytest.approx(expected[("A", "B")])
    assert comp.set_index("name").loc["B vs C"].p_holm == pytest.approx(expected[("C", "B")])
