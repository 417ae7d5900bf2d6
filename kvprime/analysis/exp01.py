"""The ``exp01`` analysis: the exp01 notebook's analysis blocks ("4. Analysis") as tidy tables, plus its
4-panel figure (drawn by ``exp01_figure``).

Pure functions, no I/O.  Conventions are those of :mod:`kvprime.analysis.stats` (read its docstring):
delta = reference NLL - treatment NLL (positive: the treatment is better), pairs matched by
``sample_id`` and non-finite pairs dropped and counted, std ddof=1, win = strictly lower NLL.
"X vs Y" always means treatment X, reference Y.

Each condition's own ``*_mean``/``*_sem``/``*_n`` are over its finite values (as in
``summary.csv``); the paired columns are over the finite pairs.  Without non-finite or missing
samples the two agree (e.g. ``gap == mean_delta`` in ``full_vs_truncated``).

Every table has a ``note`` column, empty when the row was computed.  A row whose conditions are
absent from ``scores`` keeps its labels, has NaN statistics and a note naming what is missing, so
a run over a subset of conditions still yields every table.

Where the notebook used A1 as the reference, these tables use ``baseline`` (default A1).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as st

from .exp01_conditions import A3, B1, B2, B3, B4, C1, C2, C4, C5, D1, E1
from .exp01_figure import draw_exp01_figure
from .registry import AnalysisInput, AnalysisResult, FigureSpec, register_analysis
from .stats import (
    _DEFAULT,
    PAIRED_FIELDS,
    _derive_seed,
    check_scores,
    describe,
    paired_test,
)

_NAN = float("nan")

SHIFT_SUFFIX = "_shift"
QUARTILE_LABELS = ("Easy (low NLL)", "Medium-Easy", "Medium-Hard", "Hard (high NLL)")

# Report headings, per table.
TITLES = {
    "critical": "Critical test: does RoPE correction fix truncation? (C1 broken vs C2 corrected vs A1)",
    "surrogate_quality": "Surrogate quality (all truncated and RoPE-corrected) against A1",
    "full_vs_truncated": "Full context vs truncated: is the benefit baked into the cache?",
    "ordering": "Ordering: surrogate before vs after the document",
    "similarity_correlation": "Surrogate-query similarity vs benefit (Pearson)",
    "quartiles": "C2's win rate by baseline difficulty (A1 NLL quartile)",
    "numerical_floor": "Numerical floor: re-rotation vs exact shift, and the offset control",
}

# n_pairs rather than n: the tables also carry per-condition n columns.
PAIRED_COLS = ["n_pairs", *[f for f in PAIRED_FIELDS if f != "n"]]

COLUMNS = {
    "critical": ["comparison", "reference", "treatment", "reference_mean", "reference_sem", "reference_n",
                 "treatment_mean", "treatment_sem", "treatment_n", *PAIRED_COLS, "note"],
    "surrogate_quality": ["label", "condition", "reference", "mean_nll", "sem", "n", "reference_mean",
                          *PAIRED_COLS, "note"],
    "full_vs_truncated": ["label", "full", "truncated", "full_mean", "full_sem", "full_n", "truncated_mean",
                          "truncated_sem", "truncated_n", "gap", *PAIRED_COLS, "note"],
    "ordering": ["comparison", "context", "prefix", "suffix", "prefix_mean", "prefix_sem", "prefix_n",
                 "suffix_mean", "suffix_sem", "suffix_n", "reference", "treatment", *PAIRED_COLS, "note"],
    "similarity_correlation": ["label", "condition", "reference", "n", "r", "p", "note"],
    "quartiles": ["bin", "n", "baseline_low", "baseline_high", "baseline_mean", "condition_mean",
                  "mean_delta", "ci_low", "ci_high", "win_rate", "tie_rate", "loss_rate", "p_ttest", "p_wilcoxon",
                  "note"],
    "numerical_floor": ["comparison", "reference", "treatment", "n_pairs", "max_abs_diff", "mean_abs_diff",
                        *[c for c in PAIRED_COLS if c != "n_pairs"], "note"],
}


def wide(scores: pd.DataFrame) -> pd.DataFrame:
    """sample_id x condition NLL; columns in order of first appearance, rows sorted by sample_id."""
    check_scores(scores)
    order = list(pd.unique(scores["condition"]))
    w = scores.pivot(index="sample_id", columns="condition", values="nll")
    w = w.reindex(columns=order).sort_index()
    w.columns.name = "condition"
    return w


class _Ctx:
    """Per-condition NLL series and one cached paired test per (reference, treatment)."""

    def __init__(self, scores, n_boot, seed, confidence, test_kw):
        check_scores(scores)
        self.by = {c: g.set_index("sample_id")["nll"].astype(float)
                   for c, g in scores.groupby("condition", sort=False)}
        self.n_boot, self.seed, self.confidence = n_boot, seed, confidence
        self.test_kw = dict(test_kw)  # tie tolerance, margin, alpha, power: the run's, as in summary.csv
        self._tests = {}

    def missing(self, *conds):
        return [c for c in dict.fromkeys(conds) if c not in self.by]

    def desc(self, cond, prefix):
        d = describe(self.by[cond].to_numpy()) if cond in self.by else {"mean": _NAN, "sem": _NAN, "n": 0}
        return {f"{prefix}mean": d["mean"], f"{prefix}sem": d["sem"], f"{prefix}n": d["n"]}

    def pairs(self, reference, treatment):
        # Inner join, as stats.summarize: a sample absent from one condition is not a "dropped" pair.
        j = pd.concat({"r": self.by[reference], "t": self.by[treatment]}, axis=1, join="inner").sort_index()
        return j["r"].to_numpy(), j["t"].to_numpy()

    def test(self, reference, treatment):
        if self.missing(reference, treatment):
            return dict.fromkeys(PAIRED_COLS, _NAN) | {"ci_method": None, "n_pairs": 0}
        key = (reference, treatment)
        if key not in self._tests:
            r, t = self.pairs(reference, treatment)
            # Same seed derivation as stats.summarize, so a test also in summary.csv gets the same CI.
            res = paired_test(r, t, n_boot=self.n_boot, seed=_derive_seed(self.seed, f"{treatment} vs {reference}"),
                              confidence=self.confidence, **self.test_kw)
            res["n_pairs"] = res.pop("n")
            self._tests[key] = res
        return dict(self._tests[key])


def _note(missing):
    return f"missing conditions: {', '.join(missing)}" if missing else ""


def _frame(name, rows):
    return pd.DataFrame(rows, columns=COLUMNS[name])


def _critical(cx, baseline):
    rows = []
    for ref, trt in ((C1, C2), (baseline, C2)):
        rows.append({"comparison": f"{trt.split('_', 1)[0]} vs {ref.split('_', 1)[0]}", "reference": ref,
                     "treatment": trt, **cx.desc(ref, "reference_"), **cx.desc(trt, "treatment_"),
                     **cx.test(ref, trt), "note": _note(cx.missing(ref, trt))})
    return _frame("critical", rows)


def _surrogate_quality(cx, baseline):
    rows = []
    for cond, label in ((C2, "Generated surrogate"), (C4, "Perfect (actual query)"),
                        (C5, "Static query"), (E1, "Random prefix")):
        d = cx.desc(cond, "")
        rows.append({"label": label, "condition": cond, "reference": baseline, "mean_nll": d["mean"],
                     "sem": d["sem"], "n": d["n"], "reference_mean": cx.desc(baseline, "")["mean"],
                     **cx.test(baseline, cond), "note": _note(cx.missing(baseline, cond))})
    return _frame("surrogate_quality", rows)


def _full_vs_truncated(cx):
    rows = []
    for full, trunc, label in ((B1, C2, "Generated"), (B2, C4, "Perfect (actual query)"), (B3, C5, "Static")):
        f, t = cx.desc(full, "full_"), cx.desc(trunc, "truncated_")
        rows.append({"label": label, "full": full, "truncated": trunc, **f, **t,
                     "gap": f["full_mean"] - t["truncated_mean"], **cx.test(full, trunc),
                     "note": _note(cx.missing(full, trunc))})
    return _frame("full_vs_truncated", rows)


def _ordering(cx):
    rows = []
    # treatment = prefix, reference = suffix: positive delta means the prefix placement is better.
    for prefix, suffix, context in ((C2, D1, "truncated"), (B1, B4, "full")):
        rows.append({"comparison": f"{prefix.split('_', 1)[0]} vs {suffix.split('_', 1)[0]}", "context": context,
                     "prefix": prefix, "suffix": suffix, **cx.desc(prefix, "prefix_"), **cx.desc(suffix, "suffix_"),
                     "reference": suffix, "treatment": prefix, **cx.test(suffix, prefix),
                     "note": _note(cx.missing(prefix, suffix))})
    return _frame("ordering", rows)


def _similarity_correlation(cx, similarity, baseline):
    rows = []
    for cond, label in ((C2, "C2 trunc corrected"), (B1, "B1 full generated")):
        row = {"label": label, "condition": cond, "reference": baseline, "n": 0, "r": _NAN, "p": _NAN}
        miss = cx.missing(baseline, cond)
        if similarity is None:
            rows.append(row | {"note": "no similarity data"})
            continue
        if miss:
            rows.append(row | {"note": _note(miss)})
            continue
        j = pd.concat({"sim": pd.Series(similarity, dtype=float), "ref": cx.by[baseline], "trt": cx.by[cond]},
                      axis=1, join="inner").sort_index()
        j = j[np.isfinite(j.to_numpy()).all(axis=1)]
        x, y = j["sim"].to_numpy(), (j["ref"] - j["trt"]).to_numpy()
        row["n"] = int(len(j))
        if len(j) < 3:
            rows.append(row | {"note": f"fewer than 3 finite (similarity, delta) pairs ({len(j)})"})
        elif np.ptp(x) == 0 or np.ptp(y) == 0:
            rows.append(row | {"note": "constant similarity or delta: r undefined"})
        else:
            res = st.pearsonr(x, y)
            rows.append(row | {"r": float(res.statistic), "p": float(res.pvalue), "note": ""})
    return _frame("similarity_correlation", rows)


def _quartiles(cx, baseline):
    miss = cx.missing(baseline, C2)
    if miss:
        return _frame("quartiles", [{"bin": None, "n": 0, "note": _note(miss)}])
    ref, trt = cx.pairs(baseline, C2)
    ok = np.isfinite(ref) & np.isfinite(trt)
    ref, trt = ref[ok], trt[ok]
    bins = None
    if np.unique(ref).size >= 4:
        try:
            bins = pd.qcut(ref, q=4, labels=list(QUARTILE_LABELS))
        except ValueError:  # tied values can still make duplicate quartile edges
            bins = None
    groups = ([("all", np.ones(ref.size, bool))] if bins is None
              else [(lab, np.asarray(bins == lab)) for lab in QUARTILE_LABELS])
    rows = []
    for lab, m in groups:
        r = paired_test(ref[m], trt[m], n_boot=cx.n_boot, seed=_derive_seed(cx.seed, f"{C2} vs {baseline} [{lab}]"),
                        confidence=cx.confidence, **cx.test_kw)
        rows.append({"bin": lab, "n": r["n"],
                     "baseline_low": float(ref[m].min()) if m.any() else _NAN,
                     "baseline_high": float(ref[m].max()) if m.any() else _NAN,
                     "baseline_mean": float(ref[m].mean()) if m.any() else _NAN,
                     "condition_mean": float(trt[m].mean()) if m.any() else _NAN,
                     **{k: r[k] for k in ("mean_delta", "ci_low", "ci_high", "win_rate", "tie_rate", "loss_rate",
                                          "p_ttest", "p_wilcoxon")},
                     "note": "" if bins is not None else "fewer than 4 distinct baseline values: one bin"})
    return _frame("quartiles", rows)


def _numerical_floor(cx, baseline):
    pairs = [(c, c + SHIFT_SUFFIX, "rerotate vs shift") for c in cx.by
             if not c.endswith(SHIFT_SUFFIX) and c + SHIFT_SUFFIX in cx.by]
    if not cx.missing(baseline, A3):
        pairs.append((baseline, A3, "offset vs baseline"))
    rows = []
    for ref, trt, kind in pairs:
        r, t = cx.pairs(ref, trt)
        ok = np.isfinite(r) & np.isfinite(t)
        diff = np.abs(r[ok] - t[ok])
        rows.append({"comparison": f"{trt} vs {ref} ({kind})", "reference": ref, "treatment": trt,
                     "max_abs_diff": float(diff.max()) if diff.size else _NAN,
                     "mean_abs_diff": float(diff.mean()) if diff.size else _NAN,
                     **cx.test(ref, trt), "note": ""})
    if not rows:
        rows = [{"n_pairs": 0, "note": f"no '<condition>{SHIFT_SUFFIX}' twins and no {A3} with {baseline} in scores"}]
    return _frame("numerical_floor", rows)


def exp01_analyses(scores: pd.DataFrame, similarity: pd.Series | None, *, baseline: str = "A1_baseline",
                   n_boot: int = _DEFAULT.n_boot, seed: int = 0, confidence: float = _DEFAULT.confidence,
                   tie_tolerance: float = 0.0, equivalence_margin: float = _DEFAULT.equivalence_margin,
                   alpha: float = _DEFAULT.alpha, power: float = _DEFAULT.power) -> dict[str, pd.DataFrame]:
    """One table per exp01 analysis block; column names in ``COLUMNS``.

    critical           C2 vs C1 and C2 vs baseline, with each side's mean/SEM/n
    surrogate_quality  C2, C4, C5, E1 each vs baseline
    full_vs_truncated  (B1,C2), (B2,C4), (B3,C5): reference = full, treatment = truncated;
                       gap = full_mean - truncated_mean (positive: truncation is better)
    ordering           C2 vs D1 (truncated) and B1 vs B4 (full): treatment = prefix, reference =
                       suffix (positive delta: prefix better)
    similarity_correlation  pearsonr(similarity, baseline - X) for X = C2, B1 over finite triples
    quartiles          C2 vs baseline within quartiles of the baseline NLL (pd.qcut over the finite
                       pairs); a single "all" bin when quartiles cannot be formed
    numerical_floor    |X - X_shift| for every X with an ``X_shift`` twin, and |A3 - baseline|: the
                       round-off floor of re-rotation and of the position offset

    ``n_boot``, ``seed``, ``confidence`` and the rest are those of ``stats.summarize`` (a run passes its
    ``stats.*`` settings), so a test that is also in ``summary.csv`` gets the same numbers there and here.
    """
    cx = _Ctx(scores, n_boot, seed, confidence, {"tie_tolerance": tie_tolerance, "margin": equivalence_margin,
                                                 "alpha": alpha, "power": power})
    if similarity is not None and not isinstance(similarity, pd.Series):
        raise TypeError("similarity must be a pandas Series indexed by sample_id, or None")
    return {
        "critical": _critical(cx, baseline),
        "surrogate_quality": _surrogate_quality(cx, baseline),
        "full_vs_truncated": _full_vs_truncated(cx),
        "ordering": _ordering(cx),
        "similarity_correlation": _similarity_correlation(cx, similarity, baseline),
        "quartiles": _quartiles(cx, baseline),
        "numerical_floor": _numerical_floor(cx, baseline),
    }


@register_analysis("exp01")
def exp01_analysis(run: AnalysisInput) -> AnalysisResult:
    """The exp01 notebook's printed analyses (critical test, surrogate quality, ...) and its 4-panel figure."""
    scores = run.scores[["sample_id", "condition", "nll"]]
    tables = exp01_analyses(scores, run.similarity, baseline=run.baseline, n_boot=run.n_boot, seed=run.seed,
                            confidence=run.confidence, tie_tolerance=run.tie_tolerance,
                            equivalence_margin=run.equivalence_margin, alpha=run.alpha, power=run.power)

    def draw():
        return draw_exp01_figure(scores, run.similarity, baseline=run.baseline)

    return AnalysisResult(tables, dict(TITLES), {"exp01": FigureSpec("exp01_figure.png", draw)})
