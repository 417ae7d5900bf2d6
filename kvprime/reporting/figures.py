"""Figures: the one writer every report's figures go through, and the per-run conditions chart.

``save_figure`` gives every figure (run, analyses, sweep) the same format, dpi and PNG metadata, and writes
it atomically through ``results_io.write_atomic`` (temp file + rename), so a reader never sees a
half-written PNG. Figures are built on ``matplotlib.figure.Figure`` without pyplot, so no backend or global
figure state is touched and nothing has to be closed.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..analysis.drawing import message
from ..files import results_io

# The four verdicts of kvprime.analysis.stats (and the pre-TOST "no significant difference" of older runs).
VERDICT_COLORS = {"better": "#4CAF50", "worse": "#F44336", "equivalent": "#FFB300", "inconclusive": "#9E9E9E",
                  "no significant difference": "#9E9E9E"}
BASELINE_COLOR = "#2196F3"
FORMAT = "png"
DPI = 150
# No "Software: Matplotlib version ..." chunk: a figure's bytes then depend on the run's files, not on the
# matplotlib release that drew it.
METADATA = {"Software": None}


def save_figure(fig: Figure, path) -> Path:
    """Write ``fig`` to ``path`` (PNG, ``DPI``) atomically and release its artists; returns the path."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=FORMAT, dpi=DPI, metadata=METADATA)
    finally:
        fig.clear()
    # Looked up at call time, so whatever wraps results_io.write_atomic (the fault-injection tests) sees it.
    results_io.write_atomic(Path(path), buf.getvalue())
    return Path(path)


SUMMARY_COLUMNS = ("condition", "mean", "sem", "is_baseline", "mean_delta", "ci_low", "ci_high", "verdict")


def conditions_figure(summary: pd.DataFrame, path: Path, *, title: str, margin: float | None = None) -> Path:
    """Two panels from a ``stats.summarize`` summary: mean NLL ± SEM per condition, and mean delta vs
    the baseline with its CI (colour = verdict; ``margin``: the equivalence band, shaded); the baseline is drawn
    in blue and labelled."""
    missing = [c for c in SUMMARY_COLUMNS if c not in summary.columns]
    if missing:
        raise ValueError(f"summary lacks columns: {missing}")
    s = summary.reset_index(drop=True)
    n = len(s)
    fig = Figure(figsize=(15, max(4.0, 0.45 * n + 2.0)), layout="constrained")
    fig.suptitle(title, fontsize=14)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    if n == 0:
        message(ax1, "empty summary")
        message(ax2, "empty summary")
        return save_figure(fig, path)

    y = np.arange(n)
    is_base = s["is_baseline"].astype(bool).to_numpy()
    labels = [f"{c} (baseline)" if b else str(c) for c, b in zip(s["condition"], is_base, strict=True)]
    mean = s["mean"].astype(float).to_numpy()
    sem = np.nan_to_num(s["sem"].astype(float).to_numpy())
    ax1.barh(y, mean, xerr=sem, color=[BASELINE_COLOR if b else "#B0BEC5" for b in is_base],
             edgecolor="black", linewidth=[1.5 if b else 0.0 for b in is_base], alpha=0.9, capsize=3)
    ax1.set_yticks(y, labels, fontsize=10)
    ax1.invert_yaxis()
    handles = []
    for b_mean in mean[is_base & np.isfinite(mean)][:1]:
        handles.append(ax1.axvline(b_mean, color=BASELINE_COLOR, linestyle="--", alpha=0.7,
                                   label=f"baseline mean = {b_mean:.3f}"))
    ax1.set_xlabel("Mean NLL ± SEM (lower = better)")
    ax1.set_title("Mean NLL per condition")

    md = s["mean_delta"].astype(float).to_numpy()
    lo, hi = s["ci_low"].astype(float).to_numpy(), s["ci_high"].astype(float).to_numpy()
    # A CI bound may be NaN (n < 2) or, with BCa, sit on the mean's other side; draw no bar beyond the data.
    err = np.vstack([np.clip(np.nan_to_num(md - lo), 0, None), np.clip(np.nan_to_num(hi - md), 0, None)])
    verdicts = s["verdict"].astype(str).to_numpy()
    ax2.barh(y, np.nan_to_num(md), xerr=err, color=[VERDICT_COLORS.get(v, "#9E9E9E") for v in verdicts],
             alpha=0.9, capsize=3)
    ax2.axvline(0, color="black", linewidth=1)
    if margin:
        handles.append(ax2.axvspan(-margin, margin, color=VERDICT_COLORS["equivalent"], alpha=0.15,
                                   label=f"equivalence margin ±{margin:g}"))
    for i in np.flatnonzero(is_base):
        ax2.text(0, i, "  baseline", va="center", ha="left", fontsize=9, color=BASELINE_COLOR)
    handles += [Patch(color=VERDICT_COLORS[v], label=f"verdict: {v}") for v in VERDICT_COLORS if v in set(verdicts)]
    if handles:
        # One legend under both panels: inside either it would cover the bars of the last conditions.
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10, frameon=False)
    ax2.set_xlabel("Mean delta = baseline - condition, 95% CI (positive = better than baseline)")
    ax2.set_title("Delta vs baseline")
    return save_figure(fig, path)
