"""TOST, tie tolerance, sign test, minimum detectable effect and sample sizes, against hand-computed values.

The references are written from the textbook formulas with scipy's t and noncentral-t distributions, not
with statsmodels (which kvprime uses), so a wrong call into statsmodels fails here."""

import math

import numpy as np
import pandas as pd
import pytest
from fixtures import cli
from scipy import stats as st

from kvprime.analysis import power
from kvprime.analysis.stats import (
    TIE_TOLERANCE_BY_DTYPE,
    paired_test,
    summarize,
    tie_tolerance,
)

NB = 1000
REF = np.array([2.31, 1.87, 3.02, 2.50, 1.95, 2.76, 3.40, 2.05, 2.64, 1.72, 2.2, 2.9])
DELTA = np.array([0.004, -0.006, 0.010, 0.001, -0.003, 0.007, 0.002, -0.001, 0.005, 0.000, 0.003, -0.002])


def _tost_by_hand(delta, margin):
    n, m, s = delta.size, delta.mean(), delta.std(ddof=1)
    se = s / math.sqrt(n)
    p_lower = st.t.sf((m + margin) / se, n - 1)   # H0: mean <= -margin
    p_upper = st.t.cdf((m - margin) / se, n - 1)  # H0: mean >= +margin
    return max(p_lower, p_upper)


@pytest.mark.parametrize("margin", [0.002, 0.005, 0.02])
def test_tost_matches_two_one_sided_t_tests(margin):
    r = paired_test(REF, REF - DELTA, n_boot=NB, margin=margin)
    assert r["p_tost"] == pytest.approx(_tost_by_hand(DELTA, margin), rel=1e-9)


def test_tost_small_delta_is_equivalent_large_is_not():
    small = paired_test(REF, REF - DELTA, n_boot=NB, margin=0.02)
    assert small["p_tost"] < 1e-4  # mean 0.0017, sd 0.0045, n 12: far inside +-0.02
    shifted = paired_test(REF, REF - DELTA - 0.05, n_boot=NB, margin=0.02)
    assert shifted["p_tost"] > 0.99


def test_tie_tolerance_moves_rounding_into_ties():
    d = np.array([3e-6, -2e-6, 5e-5, 0.0, 0.2, -0.1, 1e-7, 0.3])
    exact = paired_test(REF[:8], REF[:8] - d, n_boot=NB)
    assert (exact["win_rate"], exact["tie_rate"], exact["loss_rate"]) == (5 / 8, 1 / 8, 2 / 8)
    tol = paired_test(REF[:8], REF[:8] - d, n_boot=NB, tie_tolerance=1e-4)
    assert (tol["win_rate"], tol["tie_rate"], tol["loss_rate"]) == (2 / 8, 5 / 8, 1 / 8)
    # the sign test counts wins against losses, ties discarded
    assert tol["p_sign"] == pytest.approx(st.binomtest(2, 3, 0.5).pvalue)
    # Wilcoxon discards the tied pairs: the same as testing the three real deltas alone
    assert tol["p_wilcoxon"] == pytest.approx(st.wilcoxon([0.2, -0.1, 0.3]).pvalue)
    # the mean and the t-test do not change: ties only concern the sign-based numbers
    assert tol["mean_delta"] == exact["mean_delta"] and tol["p_ttest"] == exact["p_ttest"]


def test_tie_tolerance_resolution():
    assert tie_tolerance(0.003, "float32") == (0.003, "stats.tie_tolerance")
    assert tie_tolerance("auto", "float32")[0] == TIE_TOLERANCE_BY_DTYPE["float32"]
    assert tie_tolerance("auto", "bfloat16")[0] == TIE_TOLERANCE_BY_DTYPE["bfloat16"]
    floor = {"measured": True, "max_nll_abs_diff": 4e-4, "dtype": "float32"}
    assert tie_tolerance("auto", "float32", floor) == (4e-4, "auto: measured numerical floor")
    tiny = {"measured": True, "max_nll_abs_diff": 1e-7}
    assert tie_tolerance("auto", "float32", tiny)[0] == TIE_TOLERANCE_BY_DTYPE["float32"]
    assert tie_tolerance("auto", "float32", {"measured": False})[0] == TIE_TOLERANCE_BY_DTYPE["float32"]


def _power_by_hand(d, n, alpha):
    """Two-sided one-sample t-test power at standardised effect d (noncentral t)."""
    crit = st.t.ppf(1 - alpha / 2, n - 1)
    nc = d * math.sqrt(n)
    return st.nct.sf(crit, n - 1, nc) + st.nct.cdf(-crit, n - 1, nc)


@pytest.mark.parametrize("n", [10, 50, 200])
def test_mde_has_the_stated_power(n):
    sd = 0.3
    m = power.mde(sd, n, alpha=0.05, power=0.8)
    assert _power_by_hand(m / sd, n, 0.05) == pytest.approx(0.8, abs=1e-4)
    assert power.mde(sd, n, alpha=0.05, power=0.9) > m  # more power needs a larger effect


def test_mde_in_paired_test_uses_the_observed_sd():
    r = paired_test(REF, REF - DELTA, n_boot=NB, alpha=0.05, power=0.8)
    assert r["mde"] == pytest.approx(power.mde(DELTA.std(ddof=1), DELTA.size, alpha=0.05, power=0.8))
    assert math.isnan(power.mde(0.1, 1, alpha=0.05, power=0.8))


def test_n_to_detect_is_the_smallest_n_with_the_power():
    sd, effect = 0.25, 0.05
    n = int(power.n_to_detect(sd, effect, alpha=0.05, power=0.8))
    assert _power_by_hand(effect / sd, n, 0.05) >= 0.8 > _power_by_hand(effect / sd, n - 1, 0.05)
    assert n == 199  # d = 0.2: the textbook one-sample figure


def test_n_for_equivalence_gives_the_tost_its_power():
    sd, margin, alpha = 0.1, 0.02, 0.05
    n = int(power.n_for_equivalence(sd, margin, alpha=alpha, power=0.8))
    # TOST power at a true difference of 0: both one-sided tests reject; by symmetry 1 - 2 * P(one fails).
    def tost_power(k):
        crit = st.t.ppf(1 - alpha, k - 1)
        return 1 - 2 * st.nct.cdf(crit, k - 1, margin / sd * math.sqrt(k))
    assert tost_power(n) >= 0.8 > tost_power(n - 1)


def test_summarize_four_verdicts_and_one_holm_family():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 60)
    rows = [("base", base), ("better", base - 0.3 + rng.normal(0, 0.05, 60)),
            ("worse", base + 0.3 + rng.normal(0, 0.05, 60)), ("same", base + rng.normal(0, 0.002, 60)),
            ("noisy", base + rng.normal(0, 0.5, 60))]
    scores = pd.DataFrame([{"sample_id": f"s{i}", "condition": c, "nll": v}
                           for c, vals in rows for i, v in enumerate(vals)])
    summary, _ = summarize(scores, baseline="base", n_boot=NB, equivalence_margin=0.02, tie_tolerance=1e-4)
    verdicts = dict(zip(summary.condition, summary.verdict, strict=True))
    assert verdicts == {"base": "baseline", "better": "better", "worse": "worse", "same": "equivalent",
                        "noisy": "inconclusive"}
    # 4 tests x (difference, equivalence) = one family of 8: the smallest raw p is scaled by 8
    ps = np.concatenate([summary.p_ttest.to_numpy()[1:], summary.p_tost.to_numpy()[1:]])
    adj = np.concatenate([summary.p_holm.to_numpy()[1:], summary.p_tost_holm.to_numpy()[1:]])
    i = int(np.nanargmin(ps))
    assert adj[i] == pytest.approx(min(1.0, 8 * ps[i]))
    assert summary.set_index("condition").loc["noisy", "mde"] > 0.1


def _pilot(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.5, 30)
    rows = [("base", base), ("primed", base - 0.05 + rng.normal(0, 0.2, 30))]
    scores = pd.DataFrame([{"sample_id": f"s{i}", "condition": c, "nll": v}
                           for c, vals in rows for i, v in enumerate(vals)])
    comps = [{"name": "primed vs base (named)", "treatment": "primed", "reference": "base"}]
    summary, comp = summarize(scores, baseline="base", comparisons=comps, n_boot=NB)
    summary.to_csv(tmp_path / "summary.csv", index=False)
    comp.to_csv(tmp_path / "comparisons.csv", index=False)
    (tmp_path / "config.json").write_text('{"stats": {"alpha": 0.05, "power": 0.8, "equivalence_margin": 0.02}}')
    return summary


def test_power_plan_rows(tmp_path):
    from kvprime.reporting.power_plan import plan

    summary = _pilot(tmp_path)
    table, used = plan(tmp_path, effect=0.02)
    assert used == {"alpha": 0.05, "power": 0.8, "margin": 0.02, "effect": 0.02}
    assert list(table.test) == ["primed vs base", "primed vs base (named)"]
    sd = float(summary.set_index("condition").loc["primed", "std_delta"])
    assert table.n_to_detect.iloc[0] == power.n_to_detect(sd, 0.02, alpha=0.05, power=0.8)
    assert table.n_for_equivalence.iloc[0] == power.n_for_equivalence(sd, 0.02, alpha=0.05, power=0.8)
    table9, _ = plan(tmp_path, effect=0.02, power=0.9)
    assert table9.n_to_detect.iloc[0] > table.n_to_detect.iloc[0]


@pytest.mark.integration
def test_power_command(tmp_path):
    _pilot(tmp_path)
    ok = cli.run(["power", str(tmp_path), "--effect", "0.02"])
    assert ok.returncode == 0, ok.stderr
    assert "| primed vs base |" in ok.stdout and "n_for_equivalence" in ok.stdout
    bad = cli.run(["power", str(tmp_path), "--effect", "0.02",
                   "--power", "1.5"])
    assert bad.returncode == 2 and "--power=1.5" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "summary.csv").unlink()
    gone = cli.run(["power", str(tmp_path), "--effect", "0.02"])
    assert gone.returncode == 2 and "summary.csv is missing" in gone.stderr
