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
* tie: |delta| <= tie_tolerance (the numerical floor: rounding is not an effect);
  win = delta > tie_tolerance; loss = delta < -tie_tolerance.  The three rates sum to 1.
  With tie_tolerance 0 a tie is an exact zero.
* p_ttest = scipy.stats.ttest_rel(reference, treatment); p_wilcoxon =
  scipy.stats.wilcoxon(delta) with ties (as above) set to zero and discarded
  (zero_method "wilcox"), NaN when every pair is a tie; p_sign = exact binomial
  test of wins against losses (ties discarded).
* p_tost = statsmodels' ttost_paired: two one-sided paired t-tests of
  -margin < mean delta < margin (equivalence_margin, nats); with constant deltas
  (sd 0) it is 0 when |mean| < margin, else 1.
* mde = the minimum detectable |mean delta| at this n, alpha and power
  (``kvprime.analysis.power.mde``: statsmodels' paired t-test power with the observed sd).
* CI: scipy.stats.bootstrap of mean(delta), BCa, falling back to percentile
  when BCa fails or is NaN (e.g. constant deltas); ``ci_method`` says which.
* Holm family: in ``summarize``, ALL distinct tests of one run form one family --
  every non-baseline condition vs the baseline plus every named comparison, a
  comparison identical to a vs-baseline test counted once -- and each test's
  difference p (p_ttest) and equivalence p (p_tost) are Holm-adjusted together
  (p_holm, p_tost_holm).  NaN p-values are not counted in m.
* verdict: "equivalent" when p_tost_holm < alpha (the mean delta is shown to lie
  within the margin, even if it also differs from 0); else "better"/"worse" when
  p_holm < alpha (by the sign of the mean delta); else "inconclusive".
"""
from __future__ import annotations

import inspect
import math
import warnings
import zlib
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as st
from statsmodels.stats.weightstats import ttost_paired

from ..config.settings import Stats
from .power import mde

_NAN = float("nan")
PAIRED_FIELDS = ("n", "n_dropped_nonfinite", "mean_delta", "std_delta", "sem_delta", "ci_low",
                 "ci_high", "ci_method", "win_rate", "tie_rate", "loss_rate", "t_stat", "p_ttest",
                 "w_stat", "p_wilcoxon", "p_sign", "p_tost", "d_z", "mde")
VERDICTS = ("better", "worse", "equivalent", "inconclusive")
# stats.tie_tolerance=auto: a per-sample |delta| at or below this is rounding, not an effect. float32: the
# offset-0 vs offset-N twins of one cache (A1/A3) differ by 1e-6..1e-5 nats per sample on SmolLM2, and padded vs
# unpadded batches by < 1e-5 (tests hold batching to 1e-4); 1e-4 is above both and 200x below the equivalence
# margin. bfloat16 keeps 8 mantissa bits (relative rounding 4e-3 per value), so a sample's mean NLL moves by
# ~1e-3..1e-2 between equivalent computations. The run's measured floor (metadata numerical_floor) raises it.
TIE_TOLERANCE_BY_DTYPE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
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
        pairs = sorted({(str(s), str(c))
                        for s, c in scores.loc[dup, ["sample_id", "condition"]].itertuples(index=False)})
        raise ValueError(f"duplicated (sample_id, condition): {pairs[:10]}")


def tie_tolerance(setting, dtype: str | None, floor: dict | None = None) -> tuple[float, str]:
    """The tie tolerance a run uses and where it came from: the ``stats.tie_tolerance`` number, or for ``auto``
    the dtype's value (``TIE_TOLERANCE_BY_DTYPE``), raised to the measured numerical floor's NLL difference."""
    if setting != "auto":
        return float(setting), "stats.tie_tolerance"
    value = TIE_TOLERANCE_BY_DTYPE.get(dtype or "float32", TIE_TOLERANCE_BY_DTYPE["float32"])
    source = f"auto: {dtype or 'float32'} default"
    measured = (floor or {}).get("max_nll_abs_diff")
    if (floor or {}).get("measured") and measured is not None and math.isfinite(measured) and measured > value:
        value, source = float(measured), "auto: measured numerical floor"
    return value, source


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
            # batch bounds memory (resamples and BCa's leave-one-out rows, ~1M values at a time); the draws and
            # so the interval do not depend on it.
            res = st.bootstrap((delta,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                               method=method, vectorized=True, batch=max(1, (1 << 20) // max(1, len(delta))),
                               **{_RNG_KW: np.random.default_rng(seed)})
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        except Exception:  # degenerate data make BCa raise in some scipy versions
            continue
        if np.isfinite(lo) and np.isfinite(hi):
            return lo, hi, method
    return _NAN, _NAN, None


def _tost(ref, trt, delta, sd, margin) -> float:
    if sd == 0:  # constant deltas: statsmodels divides by zero; the mean is exactly known
        return 0.0 if abs(float(delta.mean())) < margin else 1.0
    p = float(ttost_paired(ref, trt, -margin, margin)[0])
    return p if math.isfinite(p) else _NAN


def paired_test(reference, treatment, *, n_boot: int = _DEFAULT.n_boot, seed: int = 0,
                confidence: float = _DEFAULT.confidence, tie_tolerance: float = 0.0,
                margin: float = _DEFAULT.equivalence_margin, alpha: float = _DEFAULT.alpha,
                power: float = _DEFAULT.power) -> dict:
    _check_args(n_boot, confidence, alpha)
    _check_args(confidence=power)
    if not (tie_tolerance >= 0 and margin > 0):
        raise ValueError(f"tie_tolerance={tie_tolerance!r} must be >= 0 and margin={margin!r} > 0")
    ref = np.asarray(reference, dtype=float).ravel()
    trt = np.asarray(treatment, dtype=float).ravel()
    if ref.shape != trt.shape:
        raise ValueError(f"paired arrays differ in length: {ref.size} vs {trt.size}")
    ok = np.isfinite(ref) & np.isfinite(trt)
    ref, trt = ref[ok], trt[ok]
    delta = ref - trt
    n = int(delta.size)
    out: dict[str, Any] = dict.fromkeys(PAIRED_FIELDS, _NAN)
    out.update(n=n, n_dropped_nonfinite=int(ok.size - n), ci_method=None)
    wins, losses = delta > tie_tolerance, delta < -tie_tolerance
    if n:
        out.update(mean_delta=float(delta.mean()), win_rate=float(np.mean(wins)),
                   tie_rate=float(np.mean(~wins & ~losses)), loss_rate=float(np.mean(losses)))
        if wins.any() or losses.any():
            out["p_sign"] = float(st.binomtest(int(wins.sum()), int(wins.sum() + losses.sum()), 0.5).pvalue)
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
        out.update(p_tost=_tost(ref, trt, delta, sd, margin), mde=mde(sd, n, alpha=alpha, power=power))
        # Pairs within the tie tolerance are rounding: zeroed, then discarded by zero_method "wilcox".
        # scipy >= 1.13 returns p=1 for all-zero deltas instead of raising; there is no test then.
        signed = np.where(wins | losses, delta, 0.0)
        if np.any(signed != 0):
            try:
                w = st.wilcoxon(signed)
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


def verdict(mean_delta: float, p_adjusted: float, alpha: float = _DEFAULT.alpha,
            p_equivalence_adjusted: float = _NAN) -> str:
    """One of ``VERDICTS`` from the Holm-adjusted difference p and equivalence (TOST) p (module docstring)."""
    if p_equivalence_adjusted < alpha:  # NaN compares False -> falls through
        return "equivalent"
    if p_adjusted < alpha and mean_delta > 0:
        return "better"
    if p_adjusted < alpha and mean_delta < 0:
        return "worse"
    return "inconclusive"


def _derive_seed(seed: int, name: str) -> int:
    # Keyed by test name, not position, so reordering rows or comparisons changes nothing.
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())]).generate_state(1)[0])


def summarize(scores: pd.DataFrame, *, baseline: str, conditions: list[str] | None = None,
              comparisons: list[dict] | None = None, n_boot: int = _DEFAULT.n_boot, seed: int = 0,
              alpha: float = _DEFAULT.alpha, confidence: float = _DEFAULT.confidence, tie_tolerance: float = 0.0,
              equivalence_margin: float = _DEFAULT.equivalence_margin, power: float = _DEFAULT.power
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summary per condition vs ``baseline`` plus named comparisons.

    Holm family = every distinct (reference, treatment) test of this call: each non-baseline
    condition vs baseline and each named comparison, a named comparison that repeats a
    vs-baseline test counted once; its ``p_ttest`` and ``p_tost`` values adjusted together.
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
                                     seed=_derive_seed(seed, f"{treatment} vs {reference}"), confidence=confidence,
                                     tie_tolerance=tie_tolerance, margin=equivalence_margin, alpha=alpha,
                                     power=power)
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
    adjusted = holm([tests[k]["p_ttest"] for k in keys] + [tests[k]["p_tost"] for k in keys])
    p_holm = dict(zip(keys, adjusted[:len(keys)], strict=True))
    p_tost_holm = dict(zip(keys, adjusted[len(keys):], strict=True))
    for r in rows + comp_rows:
        key = r.pop("_key")
        if key is None:
            r.update(p_holm=_NAN, p_tost_holm=_NAN, verdict="baseline")
        else:
            r["p_holm"], r["p_tost_holm"] = float(p_holm[key]), float(p_tost_holm[key])
            r["verdict"] = verdict(r["mean_delta"], r["p_holm"], alpha, r["p_tost_holm"])
    paired_cols = [f for f in PAIRED_FIELDS if f != "n"]
    summary_cols = ["condition", "is_baseline", *describe([]), *paired_cols, "n_pairs", "p_holm", "p_tost_holm",
                    "verdict"]
    comp_cols = ["name", "treatment", "reference", *PAIRED_FIELDS, "p_holm", "p_tost_holm", "verdict"]
    return pd.DataFrame(rows, columns=summary_cols), pd.DataFrame(comp_rows, columns=comp_cols)
