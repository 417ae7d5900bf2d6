"""Per-condition statistics and pairwise comparisons of answer NLL scores.

Definitions (NLL is natural-log negative log-likelihood; lower is better):

* delta = reference - treatment, per paired sample.  Positive delta means the
  treatment has the lower NLL, i.e. the treatment is better.  Against the
  baseline, reference = baseline and treatment = the condition.
* Pairs are matched by ``sample_id`` (inner join) and sorted by it; pairs
  where either NLL is non-finite are dropped and counted, never averaged.
* std uses ddof=1; sem = std / sqrt(n).
* d_z (Cohen's d for paired data) = mean(delta) / std(delta, ddof=1);
  NaN when n < 2 or std == 0.
* win = delta > 0 strictly (treatment strictly lower NLL); tie = delta == 0
  exactly, counted apart; loss = delta < 0.  The three rates sum to 1.
* p_ttest = scipy.stats.ttest_rel(reference, treatment); p_wilcoxon =
  scipy.stats.wilcoxon(delta) with zero_method "wilcox" (zeros discarded),
  NaN when every delta is zero.
* CI: scipy.stats.bootstrap of mean(delta), BCa, falling back to percentile
  when BCa fails or is NaN (e.g. constant deltas); ``ci_method`` says which.
* Holm family: in ``summarize``, ALL distinct tests of one run form one family --
  every non-baseline condition vs the baseline plus every named comparison, a
  comparison identical to a vs-baseline test counted once -- Holm-adjusted
  together on p_ttest.  NaN p-values are not counted in m.
"""
from __future__ import annotations

import inspect
import warnings
import zlib

import numpy as np
import pandas as pd
from scipy import stats as st

from ..config.settings import Stats

_NAN = float("nan")
PAIRED_FIELDS = ("n", "n_dropped_nonfinite", "mean_delta", "std_delta", "sem_delta", "ci_low",
                 "ci_high", "ci_method", "win_rate", "tie_rate", "loss_rate", "t_stat", "p_ttest",
                 "w_stat", "p_wilcoxon", "d_z")
# scipy < 1.15 only knows random_state; newer versions prefer rng.
_RNG_KW = "rng" if "rng" in inspect.signature(st.bootstrap).parameters else "random_state"
# Defaults are the run settings' (kvprime.config.settings.Stats); a run checks its own values there (n_boot >= 1000).
# Called directly, these functions accept fewer resamples (tests use a few hundred) but refuse values that
# would only produce NaN intervals or meaningless verdicts.
_DEFAULT = Stats()


def check_scores(scores: pd.DataFrame) -> None:
    """Long scores (sample_id, condition, nll) with one row per (sample, condition), or a ValueError."""
    missing = {"sample_id", "condition", "nll"} - set(scores.columns)
    if missing:
        raise ValueError(f"scores lacks columns: {sorted(missing)}")
    dup = scores.duplicated(["sample_id", "condition"], keep=False)
    if dup.any():
        pairs = sorted({(str(s), str(c)) for s, c in scores.loc[dup, ["sample_id", "condition"]].itertuples(index=False)})
        raise ValueError(f"duplicated (sample_id, condition): {pairs[:10]}")


def _check_args(n_boot=None, confidence=None, alpha=None) -> None:
    if n_boot is not None and (isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1):
        raise ValueError(f"n_boot={n_boot!r}: the bootstrap needs a positive integer number of resamples.")
    for name, v in (("confidence", confidence), ("alpha", alpha)):
        if v is not None and not (isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and 0 < v < 1):
            raise ValueError(f"{name}={v!r}: accepted is a number strictly between 0 and 1.")


def describe(nll) -> dict:
    x = np.asarray(nll, dtype=float).ravel()
    ok = np.isfinite(x)
    v, n = x[ok], int(ok.sum())
    std = float(np.std(v, ddof=1)) if n >= 2 else _NAN
    return {"n": n, "n_nonfinite": int(x.size - n),
            "mean": float(np.mean(v)) if n else _NAN, "std": std,
            "sem": std / float(np.sqrt(n)) if n >= 2 else _NAN,
            "median": float(np.median(v)) if n else _NAN}


def _bootstrap_ci(delta, n_boot, seed, confidence):
    for method in ("BCa", "percentile"):
        try:
            res = st.bootstrap((delta,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                               method=method, vectorized=True, **{_RNG_KW: np.random.default_rng(seed)})
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        except Exception:  # degenerate data make BCa raise in some scipy versions
            continue
        if np.isfinite(lo) and np.isfinite(hi):
            return lo, hi, method
    return _NAN, _NAN, None


def paired_test(reference, treatment, *, n_boot: int = _DEFAULT.n_boot, seed: int = 0,
                confidence: float = _DEFAULT.confidence) -> dict:
    _check_args(n_boot, confidence)
    ref = np.asarray(reference, dtype=float).ravel()
    trt = np.asarray(treatment, dtype=float).ravel()
    if ref.shape != trt.shape:
        raise ValueError(f"paired arrays differ in length: {ref.size} vs {trt.size}")
    ok = np.isfinite(ref) & np.isfinite(trt)
    ref, trt = ref[ok], trt[ok]
    delta = ref - trt
    n = int(delta.size)
    out = dict.fromkeys(PAIRED_FIELDS, _NAN)
    out.update(n=n, n_dropped_nonfinite=int(ok.size - n), ci_method=None)
    if n:
        out.update(mean_delta=float(delta.mean()), win_rate=float(np.mean(delta > 0)),
                   tie_rate=float(np.mean(delta == 0)), loss_rate=float(np.mean(delta < 0)))
    if n < 2:
        return out
    # scipy warns on constant data (precision loss, degenerate BCa); the NaN/inf
    # results speak for themselves, so the warnings would only be noise.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        sd = float(np.std(delta, ddof=1))
        out.update(std_delta=sd, sem_delta=sd / float(np.sqrt(n)),
                   d_z=out["mean_delta"] / sd if sd > 0 else _NAN)
        t = st.ttest_rel(ref, trt)
        out.update(t_stat=float(t.statistic), p_ttest=float(t.pvalue))
        # scipy >= 1.13 returns p=1 for all-zero deltas instead of raising; there is no test then.
        if np.any(delta != 0):
            try:
                w = st.wilcoxon(delta)
                out.update(w_stat=float(w.statistic), p_wilcoxon=float(w.pvalue))
            except ValueError:
                pass
        lo, hi, method = _bootstrap_ci(delta, n_boot, seed, confidence)
    out.update(ci_low=lo, ci_high=hi, ci_method=method)
    return out


def holm(pvalues) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float).ravel()
    adj = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        # Step-down: the k-th smallest p (0-based) is scaled by m - k; the running max keeps
        # the adjusted values monotone in the raw p order.
        scaled = np.maximum.accumulate((m - np.arange(m)) * p[order])
        adj[order] = np.minimum(scaled, 1.0)
    return adj


def verdict(mean_delta: float, p_adjusted: float, alpha: float = _DEFAULT.alpha) -> str:
    if p_adjusted < alpha and mean_delta > 0:  # NaN compares False -> falls through
        return "better"
    if p_adjusted < alpha and mean_delta < 0:
        return "worse"
    return "no significant difference"


def _derive_seed(seed: int, name: str) -> int:
    # Keyed by test name, not position, so reordering rows or comparisons changes nothing.
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())]).generate_state(1)[0])


def summarize(scores: pd.DataFrame, *, baseline: str, conditions: list[str] | None = None,
              comparisons: list[dict] | None = None, n_boot: int = _DEFAULT.n_boot, seed: int = 0,
              alpha: float = _DEFAULT.alpha, confidence: float = _DEFAULT.confidence
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summary per condition vs ``baseline`` plus named comparisons.

    Holm family = every distinct (reference, treatment) test of this call: each non-baseline
    condition vs baseline and each named comparison, a named comparison that repeats a
    vs-baseline test counted once; adjusted together on ``p_ttest``.
    Comparison delta = reference - treatment.
    """
    _check_args(n_boot, confidence, alpha)
    check_scores(scores)
    available = list(pd.unique(scores["condition"]))
    conditions = available if conditions is None else list(conditions)
    comparisons = list(comparisons or [])
    wanted = [baseline, *conditions] + [c[k] for c in comparisons for k in ("treatment", "reference")]
    unknown = [c for c in dict.fromkeys(wanted) if c not in available]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; available: {available}")
    by = {c: g.set_index("sample_id")["nll"] for c, g in scores.groupby("condition", sort=False)}

    tests: dict[tuple[str, str], dict] = {}

    def run(reference, treatment):
        # One test per (reference, treatment) pair: a named comparison that repeats a vs-baseline test
        # shares its numbers (same bootstrap seed, same CI) and counts once in the Holm family.
        key = (reference, treatment)
        if key not in tests:
            j = pd.concat({"r": by[reference], "t": by[treatment]}, axis=1, join="inner").sort_index()
            tests[key] = paired_test(j["r"].to_numpy(), j["t"].to_numpy(), n_boot=n_boot,
                                     seed=_derive_seed(seed, f"{treatment} vs {reference}"), confidence=confidence)
        return dict(tests[key])

    rows = []
    for c in conditions:
        row = {"condition": c, "is_baseline": c == baseline, **describe(by[c].to_numpy())}
        res = dict.fromkeys(PAIRED_FIELDS, _NAN) | {"ci_method": None}
        if c != baseline:
            res = run(baseline, c)
        res["n_pairs"] = res.pop("n")
        rows.append(row | {"_key": (baseline, c) if c != baseline else None} | res)
    comp_rows = [{"name": c["name"], "treatment": c["treatment"], "reference": c["reference"],
                  "_key": (c["reference"], c["treatment"]), **run(c["reference"], c["treatment"])}
                 for c in comparisons]

    keys = list(tests)
    p_holm = dict(zip(keys, holm([tests[k]["p_ttest"] for k in keys])))
    for r in rows + comp_rows:
        key = r.pop("_key")
        if key is None:
            r.update(p_holm=_NAN, verdict="baseline")
        else:
            r["p_holm"] = float(p_holm[key])
            r["verdict"] = verdict(r["mean_delta"], r["p_holm"], alpha)
    paired_cols = [f for f in PAIRED_FIELDS if f != "n"]
    summary_cols = ["condition", "is_baseline", *describe([]), *paired_cols, "n_pairs", "p_holm", "verdict"]
    comp_cols = ["name", "treatment", "reference", *PAIRED_FIELDS, "p_holm", "verdict"]
    return pd.DataFrame(rows, columns=summary_cols), pd.DataFrame(comp_rows, columns=comp_cols)
