"""The ``answer`` metric in a run's outputs: its columns in summary.csv and comparisons.csv, its part of
results.json, its report section and its figure (NLL delta against F1 delta per condition)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import answer_quality as aq
from ..analysis.drawing import message
from ..errors import DataError
from .tables import markdown_table

FIGURE = "answer_quality.png"
SUMMARY_COLUMNS = ("condition", "mean_delta", "verdict", "n_answers", "em", "em_delta", "em_gained", "em_lost",
                   "p_mcnemar", "p_mcnemar_holm", "contains", "contains_delta", "contains_gained", "contains_lost",
                   "p_mcnemar_contains", "p_mcnemar_contains_holm", "f1", "f1_delta", "f1_ci_low", "f1_ci_high",
                   "f1_p_ttest", "f1_p_wilcoxon", "f1_p_holm")
COMPARISON_COLUMNS = ("name", "mean_delta", "verdict", "n_answers", "em_delta", "em_gained", "em_lost", "p_mcnemar",
                      "p_mcnemar_holm", "contains_delta", "contains_gained", "contains_lost", "p_mcnemar_contains",
                      "p_mcnemar_contains_holm", "f1_delta", "f1_ci_low", "f1_ci_high", "f1_p_ttest", "f1_p_holm")
COUNTS = {c: ".0f" for c in ("n_answers", "em_gained", "em_lost", "contains_gained", "contains_lost")}


def add(scores: pd.DataFrame, derived: pd.DataFrame, summary: pd.DataFrame, comparisons: pd.DataFrame, *,
        baseline: str, conditions: list[str], named: list[dict], cfg: dict, run_dir: Path):
    """summary and comparisons with the answer columns joined on, and results.json's ``answer_quality``."""
    # A field added later (contains) is missing from older score lines: NaN in its columns, not an error.
    missing = [c for c in aq.SCORE_FIELDS if c not in scores and c not in aq.LATER_SCORE_FIELDS]
    if missing:
        raise DataError(f"{run_dir / 'scores.jsonl'} lacks the answer fields {missing}, but the run's metrics include "
                        "answer: its score lines were written without them. Rerun with metrics=[nll,answer].")
    st = cfg["stats"]
    a_sum, a_comp = aq.summarize(aq.frame(scores, derived), baseline=baseline, conditions=conditions,
                                 comparisons=named, n_boot=st["n_boot"], seed=cfg["seed"], confidence=st["confidence"],
                                 alpha=st["alpha"])
    summary = summary.merge(a_sum, on="condition", how="left")
    comparisons = comparisons.merge(a_comp, on="name", how="left")
    part = {"max_new_tokens": cfg["answer"]["max_new_tokens"], "normalisation": aq.NORMALISATION,
            "stops": aq.stop_counts(scores).to_dict(orient="records"),
            "summary": summary[[c for c in SUMMARY_COLUMNS if c in summary]].to_dict(orient="records"),
            "comparisons": comparisons[[c for c in COMPARISON_COLUMNS if c in comparisons]].to_dict(orient="records")}
    return summary, comparisons, part


def section(part: dict) -> list[str]:
    """The report's answer-quality section, from results.json's ``answer_quality``."""
    parts = [
        "## Answer quality: exact match, contains and F1",
        f"Each condition's answer is decoded greedily from its cache and prompt (at most {part['max_new_tokens']} "
        "new tokens; it ends at the first newline or an end token) and scored against every reference answer, "
        f"taking the best: exact match (EM) and token F1 as SQuAD scores them, after normalisation: "
        f"{part['normalisation']}. `contains` is 1 when a normalised reference appears, as whole tokens, in the "
        "normalised answer: instruct models answer in sentences, which EM scores 0 even when they are right (the "
        "accuracy of open-domain QA with chatty LLMs, e.g. Liu et al. 2023). `em_delta`, `contains_delta` and "
        "`f1_delta` = condition - reference (positive: better answers), "
        "beside the NLL `mean_delta` (reference - condition; positive: lower NLL). EM: McNemar's exact test "
        "(statsmodels) of the discordant pairs, `em_gained` (right only with the condition) against `em_lost`; "
        "contains: the same test (`contains_gained`, `contains_lost`, `p_mcnemar_contains`); F1: the paired t-test, "
        "Wilcoxon and bootstrap CI of the NLL statistics. Holm: the EM McNemar p-values of all the run's tests form "
        "one family, the contains McNemar p-values another, the F1 t-test p-values a third.",
        markdown_table(pd.DataFrame(part["summary"]), SUMMARY_COLUMNS, formats=COUNTS),
    ]
    if part.get("comparisons"):
        parts += ["Named comparisons:", markdown_table(pd.DataFrame(part["comparisons"]), COMPARISON_COLUMNS,
                                                       formats=COUNTS)]
    if part.get("stops"):
        parts += ["How the decoding of the answers ended (newline: the answer's line ended; eos: an end token; "
                  "max_new_tokens: the limit; window: a sliding attention window):",
                  markdown_table(pd.DataFrame(part["stops"]))]
    return parts


def figure(summary: pd.DataFrame, path: Path, *, title: str) -> Path:
    """NLL delta (x) against F1 delta (y) vs the baseline, one point per condition with both 95% CIs; colour =
    the NLL verdict. Points up and to the right are better on both."""
    # lazy: matplotlib (figures are optional output; finalize skips them without it)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from .figures import VERDICT_COLORS, save_figure

    s = summary[~summary["is_baseline"].astype(bool)].reset_index(drop=True)
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax = fig.subplots()
    fig.suptitle(title, fontsize=13)
    if not len(s) or s["f1_delta"].isna().all():
        message(ax, "no condition to compare with the baseline")
        return save_figure(fig, path)
    x, y = s["mean_delta"].astype(float).to_numpy(), s["f1_delta"].astype(float).to_numpy()

    def err(mid, lo, hi):
        return np.vstack([np.clip(np.nan_to_num(mid - lo), 0, None), np.clip(np.nan_to_num(hi - mid), 0, None)])

    xerr = err(x, s["ci_low"].astype(float).to_numpy(), s["ci_high"].astype(float).to_numpy())
    yerr = err(y, s["f1_ci_low"].astype(float).to_numpy(), s["f1_ci_high"].astype(float).to_numpy())
    for i, row in s.iterrows():
        color = VERDICT_COLORS.get(str(row["verdict"]), "#9E9E9E")
        ax.errorbar(x[i], y[i], xerr=xerr[:, i:i + 1], yerr=yerr[:, i:i + 1], fmt="o", color=color, ecolor=color,
                    capsize=3, markersize=7)
        ax.annotate(str(row["condition"]), (x[i], y[i]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    seen = [v for v in VERDICT_COLORS if v in set(s["verdict"].astype(str))]
    if seen:
        ax.legend(handles=[Patch(color=VERDICT_COLORS[v], label=f"NLL verdict: {v}") for v in seen], fontsize=9,
                  loc="best")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("NLL delta = baseline - condition, 95% CI (positive = lower NLL)")
    ax.set_ylabel("F1 delta = condition - baseline, 95% CI (positive = better answers)")
    return save_figure(fig, path)
