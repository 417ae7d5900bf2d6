import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from kvprime.analysis.exp01 import COLUMNS, QUARTILE_LABELS, exp01_analyses, wide
from kvprime.analysis.exp01_conditions import EXP01_CONDITIONS
from kvprime.analysis.exp01_figure import draw_exp01_figure
from kvprime.analysis.stats import summarize
from kvprime.reporting.figures import conditions_figure, save_figure

NB = 200  # bootstrap resamples: the CIs are not what these tests check
N = 40
A1, A3 = "A1_baseline", "A3_baseline_offset"
B1, B2, B3, B4 = "B1_full_generated", "B2_full_perfect", "B3_full_static", "B4_full_suffix"
C1, C2, C4, C5 = ("C1_trunc_generated_broken", "C2_trunc_generated_corrected",
                  "C4_trunc_perfect_corrected", "C5_trunc_static_corrected")
D1, E1 = "D1_trunc_suffix_corrected", "E1_random_prefix_trunc_corrected"
C2S = C2 + "_shift"


def make_wide(seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"s{i:02d}" for i in range(N)]
    a1 = rng.uniform(0.5, 3.0, N)
    noise = lambda s=0.05: rng.normal(0, s, N)  # noqa: E731
    w = {
        A1: a1, "A2_bare_doc": a1 + noise(), A3: a1 + rng.normal(0, 1e-7, N),
        B1: a1 - 0.2 + noise(), B2: a1 - 0.3 + noise(), B3: a1 - 0.1 + noise(), B4: a1 + 0.05 + noise(),
        C1: a1 + 0.5, C2: a1 - 0.1 + noise(), "C3_trunc_perfect_broken": a1 + 0.6,
        C4: a1 - 0.15 + noise(), C5: a1 - 0.05 + noise(), D1: a1.copy(),
        E1: a1 + noise(), "E2_full_random_prefix": a1 + noise(),
    }
    w[C2S] = w[C2] + 1e-6
    return pd.DataFrame(w, index=pd.Index(ids, name="sample_id"))


def to_long(w, seed=1):
    long = w.reset_index().melt(id_vars="sample_id", var_name="condition", value_name="nll")
    # Shuffled rows: every result must come from matching sample_ids, not from row order.
    return long.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="module")
def data():
    w = make_wide()
    rng = np.random.default_rng(2)
    sim = pd.Series(rng.uniform(0, 1, N), index=w.index)
    sim = sim.sample(frac=1.0, random_state=3)  # a different order again
    return w, to_long(w), sim


@pytest.fixture(scope="module")
def tables(data):
    _, long, sim = data
    return exp01_analyses(long, sim, n_boot=NB, seed=0)


def row(t, col, value):
    r = t[t[col] == value]
    assert len(r) == 1, (col, value, t)
    return r.iloc[0]


def sem(x):
    return np.std(x, ddof=1) / np.sqrt(len(x))


# ---------------------------------------------------------------- wide
def test_wide_pivots_by_sample_and_rejects_duplicates(data):
    w, long, _ = data
    got = wide(long)
    assert list(got.columns) == list(pd.unique(long["condition"]))
    pd.testing.assert_frame_equal(got[list(w.columns)], w, check_names=False)
    with pytest.raises(ValueError, match="duplicated"):
        wide(pd.concat([long, long.iloc[:1]]))


def test_every_table_has_its_columns(tables):
    assert set(tables) == set(COLUMNS)
    for name, t in tables.items():
        assert list(t.columns) == COLUMNS[name], name
        assert (t["note"] == "").all(), (name, t["note"].tolist())


# ---------------------------------------------------------------- the analyses
def test_critical_c2_beats_c1_with_hand_computed_numbers(data, tables):
    w, _, _ = data
    t = tables["critical"]
    assert t["comparison"].tolist() == ["C2 vs C1", "C2 vs A1"]
    r = row(t, "comparison", "C2 vs C1")
    assert (r["reference"], r["treatment"]) == (C1, C2)
    assert r["mean_delta"] == pytest.approx((w[C1] - w[C2]).mean())
    assert r["mean_delta"] > 0.5 and r["win_rate"] == 1.0 and r["n_pairs"] == N
    assert r["reference_mean"] == pytest.approx(w[C1].mean()) and r["reference_sem"] == pytest.approx(sem(w[C1]))
    assert r["treatment_mean"] == pytest.approx(w[C2].mean()) and r["treatment_sem"] == pytest.approx(sem(w[C2]))
    assert r["p_ttest"] == pytest.approx(st.ttest_rel(w[C1], w[C2]).pvalue)
    r = row(t, "comparison", "C2 vs A1")
    assert (r["reference"], r["treatment"]) == (A1, C2)
    d = w[A1] - w[C2]
    assert r["mean_delta"] == pytest.approx(d.mean())
    assert r["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert r["ci_low"] < r["mean_delta"] < r["ci_high"]


def test_surrogate_quality_rows_against_baseline(data, tables):
    w, _, _ = data
    t = tables["surrogate_quality"]
    assert t["label"].tolist() == ["Generated surrogate", "Perfect (actual query)", "Static query", "Random prefix"]
    assert t["condition"].tolist() == [C2, C4, C5, E1]
    for _, r in t.iterrows():
        d = w[A1] - w[r["condition"]]
        assert r["reference"] == A1
        assert r["mean_nll"] == pytest.approx(w[r["condition"]].mean())
        assert r["mean_delta"] == pytest.approx(d.mean())
        assert r["win_rate"] == pytest.approx((d > 0).mean())
        assert r["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
        assert r["p_ttest"] == pytest.approx(st.ttest_rel(w[A1], w[r["condition"]]).pvalue)


def test_full_vs_truncated_gap_is_difference_of_means(data, tables):
    w, _, _ = data
    t = tables["full_vs_truncated"]
    assert list(zip(t["full"], t["truncated"], strict=True)) == [(B1, C2), (B2, C4), (B3, C5)]
    for _, r in t.iterrows():
        gap = w[r["full"]].mean() - w[r["truncated"]].mean()
        assert r["gap"] == pytest.approx(gap)
        assert r["mean_delta"] == pytest.approx(gap)  # reference = full, treatment = truncated
        assert r["full_mean"] == pytest.approx(w[r["full"]].mean())
    assert row(t, "label", "Generated")["gap"] < 0  # B1 (-0.2) beats C2 (-0.1)


def test_ordering_treatment_is_prefix_reference_is_suffix(data, tables):
    w, _, _ = data
    t = tables["ordering"]
    r = row(t, "comparison", "C2 vs D1")
    assert (r["reference"], r["treatment"], r["context"]) == (D1, C2, "truncated")
    assert r["mean_delta"] == pytest.approx((w[D1] - w[C2]).mean()) and r["mean_delta"] > 0
    assert r["prefix_mean"] == pytest.approx(w[C2].mean()) and r["suffix_mean"] == pytest.approx(w[A1].mean())
    r = row(t, "comparison", "B1 vs B4")
    assert (r["reference"], r["treatment"], r["context"]) == (B4, B1, "full")
    assert r["mean_delta"] == pytest.approx((w[B4] - w[B1]).mean())
    assert r["t_stat"] == pytest.approx(st.ttest_rel(w[B4], w[B1]).statistic)


def test_similarity_correlation_matches_pearsonr(data, tables):
    w, _, sim = data
    t = tables["similarity_correlation"]
    for cond in (C2, B1):
        r = row(t, "condition", cond)
        ref = st.pearsonr(sim.reindex(w.index).to_numpy(), (w[A1] - w[cond]).to_numpy())
        assert r["n"] == N
        assert r["r"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)


def test_similarity_none_or_too_few_gives_noted_rows(data):
    w, long, sim = data
    t = exp01_analyses(long, None, n_boot=NB)["similarity_correlation"]
    assert list(t.columns) == COLUMNS["similarity_correlation"]
    assert t["r"].isna().all() and (t["note"] == "no similarity data").all()
    t = exp01_analyses(long, sim.iloc[:2], n_boot=NB)["similarity_correlation"]
    assert t["r"].isna().all() and t["note"].str.contains("fewer than 3").all()
    assert (t["n"] == 2).all()


def test_quartiles_bins_sum_and_hand_counted_win_rates(data, tables):
    w, _, _ = data
    t = tables["quartiles"]
    assert t["bin"].tolist() == list(QUARTILE_LABELS)
    assert t["n"].sum() == N
    bins = pd.qcut(w[A1], q=4, labels=list(QUARTILE_LABELS))
    for _, r in t.iterrows():
        m = bins == r["bin"]
        d = w.loc[m, A1] - w.loc[m, C2]
        assert r["n"] == m.sum()
        assert r["win_rate"] == pytest.approx((d > 0).mean())
        assert r["mean_delta"] == pytest.approx(d.mean())
        assert r["baseline_low"] == pytest.approx(w.loc[m, A1].min())
    assert t["baseline_high"].is_monotonic_increasing


def test_quartiles_single_bin_with_few_distinct_baselines():
    w = make_wide()
    w[A1] = np.where(np.arange(N) % 2, 1.0, 2.0)
    t = exp01_analyses(to_long(w), None, n_boot=NB)["quartiles"]
    assert t["bin"].tolist() == ["all"] and t["n"].iloc[0] == N
    assert t["mean_delta"].iloc[0] == pytest.approx((w[A1] - w[C2]).mean())
    assert "one bin" in t["note"].iloc[0]


def test_numerical_floor_twins_and_offset(data, tables):
    w, _, _ = data
    t = tables["numerical_floor"]
    r = row(t, "treatment", C2S)
    assert r["reference"] == C2 and r["n_pairs"] == N
    assert r["max_abs_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert r["mean_abs_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert r["mean_delta"] == pytest.approx(-1e-6, rel=1e-3)
    r = row(t, "treatment", A3)
    assert r["reference"] == A1
    assert r["max_abs_diff"] == pytest.approx((w[A1] - w[A3]).abs().max())
    assert r["max_abs_diff"] < 1e-6
    assert len(t) == 2  # only C2 has a twin


def test_numerical_floor_without_twins_or_offset(data):
    w, _, _ = data
    t = exp01_analyses(to_long(w.drop(columns=[C2S, A3])), None, n_boot=NB)["numerical_floor"]
    assert len(t) == 1 and t["max_abs_diff"].isna().all() and "no '<condition>_shift' twins" in t["note"].iloc[0]


def test_nan_is_excluded_and_counted(data):
    w, _, sim = data
    w = w.copy()
    w.loc["s03", C2] = np.nan
    w.loc["s07", C2] = np.inf
    tabs = exp01_analyses(to_long(w), sim, n_boot=NB)
    ok = np.isfinite(w[C2])
    r = row(tabs["critical"], "comparison", "C2 vs A1")
    assert r["n_pairs"] == N - 2 and r["n_dropped_nonfinite"] == 2 and r["treatment_n"] == N - 2
    assert r["mean_delta"] == pytest.approx((w.loc[ok, A1] - w.loc[ok, C2]).mean())
    assert r["treatment_mean"] == pytest.approx(w.loc[ok, C2].mean())
    assert tabs["quartiles"]["n"].sum() == N - 2
    assert row(tabs["similarity_correlation"], "condition", C2)["n"] == N - 2
    fl = row(tabs["numerical_floor"], "treatment", C2S)
    assert np.isfinite(fl["max_abs_diff"]) and fl["n_pairs"] == N - 2
    for name, t in tabs.items():
        num = t.select_dtypes("number")
        assert not np.isinf(num.to_numpy()).any(), name


def test_subset_of_conditions_gives_notes_not_exceptions(data):
    w, _, sim = data
    tabs = exp01_analyses(to_long(w[[A1, C2, B1]]), sim, n_boot=NB)
    for name, t in tabs.items():
        assert list(t.columns) == COLUMNS[name]
    r = row(tabs["critical"], "comparison", "C2 vs C1")
    assert np.isnan(r["mean_delta"]) and r["n_pairs"] == 0 and C1 in r["note"]
    assert row(tabs["critical"], "comparison", "C2 vs A1")["note"] == ""
    sq = tabs["surrogate_quality"]
    assert sq.loc[sq["condition"] == C4, "note"].item() == f"missing conditions: {C4}"
    assert np.isfinite(sq.loc[sq["condition"] == C2, "mean_delta"].item())
    assert tabs["ordering"]["note"].str.startswith("missing conditions").all()
    assert (tabs["similarity_correlation"]["note"] == "").all()
    # Without the baseline nothing that needs it is computed, still without an exception.
    tabs = exp01_analyses(to_long(w[[C1, C2]]), sim, n_boot=NB)
    assert A1 in tabs["quartiles"]["note"].iloc[0]
    assert tabs["surrogate_quality"]["mean_delta"].isna().all()
    assert row(tabs["critical"], "comparison", "C2 vs C1")["note"] == ""


def test_bad_input_is_refused(data):
    _, long, _ = data
    with pytest.raises(ValueError, match="lacks columns"):
        exp01_analyses(long.drop(columns="nll"), None)
    with pytest.raises(ValueError, match="duplicated"):
        exp01_analyses(pd.concat([long, long.iloc[:3]]), None)


# ---------------------------------------------------------------- figures
def exp01_figure(scores, similarity, path):
    """The exp01 figure as a run's report gets it: drawn by the analysis, saved by the report's writer."""
    return save_figure(draw_exp01_figure(scores, similarity), path)


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.figures
def test_exp01_figure_full(tmp_path, data):
    _, long, sim = data
    out = exp01_figure(long, sim, tmp_path / "fig" / "exp01.png")
    assert out == tmp_path / "fig" / "exp01.png" and out.is_file()
    assert png_size(out) == (2400, 1800)
    assert [p.name for p in out.parent.iterdir()] == ["exp01.png"]  # no temp file left behind


@pytest.mark.figures
def test_exp01_figure_subset_nan_and_no_similarity(tmp_path, data):
    full, _, _ = data
    w = full[[A1, C2, D1]].copy()
    w.loc["s01", C2] = np.nan
    out = exp01_figure(to_long(w), None, tmp_path / "sub.png")
    assert png_size(out)[0] >= 1500
    out = exp01_figure(to_long(full[[B1]]), None, tmp_path / "nobase.png")
    assert png_size(out)[0] >= 1500


@pytest.mark.figures
def test_conditions_figure_from_summary(tmp_path, data):
    _, long, _ = data
    summary, _ = summarize(long, baseline=A1, n_boot=NB)
    out = conditions_figure(summary, tmp_path / "cond.png", title="synthetic exp01")
    w, h = png_size(out)
    assert w >= 1500 and h > 0
    with pytest.raises(ValueError, match="summary lacks"):
        conditions_figure(summary.drop(columns="verdict"), tmp_path / "x.png", title="t")


def test_condition_names_are_the_notebooks():
    assert len(EXP01_CONDITIONS) == 15 and set(make_wide().columns) == {*EXP01_CONDITIONS, C2S}
