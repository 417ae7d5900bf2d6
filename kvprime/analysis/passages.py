"""The per-passage view (``experiment.analyses: per_passage``) of a run whose questions are grouped by passage
(``dataset.group_by_passage``).

The questions of one passage share its document and often its answer sentence, so their deltas are not
independent: the per-question tests of ``summary.csv`` treat n questions as n independent draws and make
intervals too narrow when a passage's questions move together. Here every test (each condition vs the
baseline, each named comparison) is recomputed with the passage as the unit:

- ``ci_low``/``ci_high``: a cluster bootstrap of the question-level mean delta, resampling whole passages
  (scipy.stats.bootstrap over paired per-passage (sum of deltas, number of questions), statistic
  sum/sum; BCa, percentile when BCa fails), seeded per test from the run seed as summary.csv's CIs are
  (``stats._derive_seed``, "<treatment> vs <reference> (passages)");
- ``design_effect``: the cluster bootstrap's variance of the mean over the independent-questions variance
  (sd^2/n): 1 when passages do not matter, larger when their questions move together;
- ``passage_mean_delta``: the mean of the passages' mean deltas (each passage counts once);
- passages better / tied / worse (a passage's mean delta beyond +-tie tolerance) and the sign test over them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as st

from ..errors import ConfigError
from .registry import AnalysisInput, AnalysisResult, register_analysis
from .stats import _RNG_KW, _derive_seed

TABLE = "per_passage"
TITLE = "Per passage: cluster bootstrap over passages (questions of one passage are not independent)"
COLUMNS = ("test", "treatment", "reference", "n_questions", "n_passages", "mean_delta", "ci_low", "ci_high",
           "ci_method", "design_effect", "passage_mean_delta", "passages_better", "passages_tied",
           "passages_worse", "p_sign_passages")


def _ratio(sums, counts, axis=-1):
    return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)


def cluster_ci(delta, clusters, *, n_boot: int, seed: int, confidence: float) -> dict:
    """The mean of ``delta`` with a bootstrap CI that resamples whole ``clusters``, and the design effect."""
    frame = pd.DataFrame({"d": np.asarray(delta, dtype=float), "c": np.asarray(clusters)})
    per = frame.groupby("c", sort=True)["d"].agg(["sum", "count"])
    sums, counts = per["sum"].to_numpy(), per["count"].to_numpy().astype(float)
    out: dict[str, Any] = {"mean_delta": float(frame["d"].mean()) if len(frame) else math.nan, "ci_low": math.nan,
           "ci_high": math.nan, "ci_method": None, "design_effect": math.nan}
    if len(per) < 2:
        return out
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for method in ("BCa", "percentile"):
            try:
                res = st.bootstrap((sums, counts), _ratio, paired=True, vectorized=True, n_resamples=n_boot,
                                   confidence_level=confidence, method=method,
                                   **{_RNG_KW: np.random.default_rng(seed)})
            except Exception:  # degenerate data make BCa raise in some scipy versions
                continue
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
            if np.isfinite(lo) and np.isfinite(hi):
                iid = float(np.var(frame["d"], ddof=1)) / len(frame)
                boot = float(np.var(res.bootstrap_distribution, ddof=1))
                out.update(ci_low=lo, ci_high=hi, ci_method=method,
                           design_effect=boot / iid if iid > 0 else math.nan)
                break
    return out


def _tests(run: AnalysisInput, names) -> list[tuple[str, str, str]]:
    tests = [(f"{c} vs {run.baseline}", c, run.baseline) for c in names if c != run.baseline]
    for comp in run.experiment.get("comparisons") or []:
        if comp["treatment"] in names and comp["reference"] in names:
            tests.append((comp["name"], comp["treatment"], comp["reference"]))
    return tests


@register_analysis("per_passage")
def per_passage(run: AnalysisInput) -> AnalysisResult:
    """Every test with the passage as the unit: cluster-bootstrap CI, design effect, passages better/worse."""
    if "passage_id" not in run.scores:
        raise ConfigError("experiment.analyses: per_passage needs the passage of every question; set "
                          "dataset.group_by_passage=true (scores.jsonl then records passage_id).")
    scores = run.scores
    passage = scores.drop_duplicates("sample_id").set_index("sample_id")["passage_id"]
    by = {c: g.set_index("sample_id")["nll"] for c, g in scores.groupby("condition", sort=False)}
    rows = []
    for name, trt, ref in _tests(run, list(by)):
        j = pd.concat({"r": by[ref], "t": by[trt]}, axis=1, join="inner").dropna().sort_index()
        delta = (j["r"] - j["t"]).to_numpy()
        clusters = passage.loc[j.index].to_numpy()
        row = {"test": name, "treatment": trt, "reference": ref, "n_questions": len(delta),
               "n_passages": int(pd.Series(clusters).nunique())}
        # Keyed by the pair, as summary.csv's seeds are: a named comparison repeating a vs-baseline test gets the
        # same numbers.
        seed = _derive_seed(run.seed, f"{trt} vs {ref} (passages)")
        row.update(cluster_ci(delta, clusters, n_boot=run.n_boot, seed=seed, confidence=run.confidence))
        means = pd.Series(delta).groupby(clusters).mean()
        better, worse = int((means > run.tie_tolerance).sum()), int((means < -run.tie_tolerance).sum())
        row.update(passage_mean_delta=float(means.mean()) if len(means) else math.nan, passages_better=better,
                   passages_tied=len(means) - better - worse, passages_worse=worse,
                   p_sign_passages=float(st.binomtest(better, better + worse, 0.5).pvalue) if better + worse
                   else math.nan)
        rows.append(row)
    return AnalysisResult({TABLE: pd.DataFrame(rows, columns=list(COLUMNS))}, titles={TABLE: TITLE})
