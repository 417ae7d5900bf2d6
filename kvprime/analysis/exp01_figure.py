"""The exp01 analysis's figure: the notebook's 4-panel figure from the run's scores, drawn and returned (the
report saves it: ``kvprime.reporting.figures.save_figure``).

matplotlib is imported when the figure is drawn, not when this module is imported: the analysis registry
imports every module of the package, also where only the tables are wanted.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as st

from .drawing import message
from .exp01_conditions import B1, C1, C2, EXP01_CONDITIONS
from .stats import check_scores, describe

GROUP_COLORS: dict[str | None, str] = {"A": "#2196F3", "B": "#4CAF50", "C": "#FF9800", "D": "#9C27B0", "E": "#795548"}
GROUP_LABELS: dict[str | None, str] = {"A": "A: baselines", "B": "B: full context", "C": "C: truncated",
                                       "D": "D: suffix", "E": "E: random-prefix controls"}
OTHER_COLOR = "#9E9E9E"


def _group(cond: str) -> str | None:
    g = cond[:1]
    return g if g in GROUP_COLORS and cond[1:2].isdigit() else None


def draw_exp01_figure(scores: pd.DataFrame, similarity: pd.Series | None, *, baseline: str = "A1_baseline"):
    """The notebook's 2x2 figure (16x12 in): all conditions, the critical test, the C2 delta histogram, and
    similarity vs C2 delta.  Delta = baseline - C2 (positive: C2 better)."""
    # lazy: matplotlib; the analysis registry imports this module where only tables are wanted
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    check_scores(scores)
    by = {c: g.set_index("sample_id")["nll"].astype(float) for c, g in scores.groupby("condition", sort=False)}
    stats = {c: describe(v.to_numpy()) for c, v in by.items()}
    base_mean = stats[baseline]["mean"] if baseline in stats else float("nan")

    fig = Figure(figsize=(16, 12), layout="constrained")
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)

    # (1) every condition present: the notebook's 15 in its order, then any others (e.g. *_shift twins).
    conds = [c for c in EXP01_CONDITIONS if c in by] + sorted(c for c in by if c not in EXP01_CONDITIONS)
    conds = [c for c in conds if stats[c]["n"] > 0]
    absent = [c for c in EXP01_CONDITIONS if c not in by]
    if conds:
        y = np.arange(len(conds))
        colors = [GROUP_COLORS.get(_group(c), OTHER_COLOR) for c in conds]
        ax1.barh(y, [stats[c]["mean"] for c in conds], xerr=np.nan_to_num([stats[c]["sem"] for c in conds]),
                 color=colors, alpha=0.85, capsize=3)
        ax1.set_yticks(y, conds, fontsize=9)
        ax1.invert_yaxis()
        handles = [Patch(color=GROUP_COLORS[g], label=GROUP_LABELS[g])
                   for g in GROUP_COLORS if any(_group(c) == g for c in conds)]
        if any(_group(c) is None for c in conds):
            handles.append(Patch(color=OTHER_COLOR, label="other"))
        if np.isfinite(base_mean):
            handles.append(ax1.axvline(base_mean, color="blue", linestyle="--", alpha=0.6,
                                       label=f"{baseline} mean = {base_mean:.3f}"))
        ax1.set_xlabel("Mean NLL ± SEM (lower = better)")
        # Below the axes: inside, it would cover the bars of the last conditions.
        ax1.legend(handles=handles, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3,
                   frameon=False)
        title = "All conditions: mean NLL"
        if absent:
            title += f"\n({len(absent)} of the notebook's conditions not in these scores)"
        ax1.set_title(title)
    else:
        message(ax1, "no conditions with finite NLL")

    # (2) the critical comparison.
    crit = [(baseline, f"{baseline.split('_', 1)[0]}: Baseline"), (C1, "C1: Broken\n(no RoPE fix)"),
            (C2, "C2: Corrected\n(RoPE fix)"), (B1, "B1: Full\n(surrogate kept)")]
    present = [(c, lab) for c, lab in crit if c in stats and stats[c]["n"] > 0]
    if present:
        x = np.arange(len(present))
        ax2.bar(x, [stats[c]["mean"] for c, _ in present], yerr=np.nan_to_num([stats[c]["sem"] for c, _ in present]),
                color=[GROUP_COLORS.get(_group(c), OTHER_COLOR) if c != C1 else "#F44336" for c, _ in present],
                alpha=0.85, capsize=4)
        ax2.set_xticks(x, [lab for _, lab in present], fontsize=10)
        if np.isfinite(base_mean):
            ax2.axhline(base_mean, color="blue", linestyle="--", alpha=0.6)
        ax2.set_ylabel("Mean NLL ± SEM")
        title = "Critical test: RoPE correction effect"
        missing = [c for c, _ in crit if c not in dict(present)]
        if missing:
            title += f"\n(missing: {', '.join(missing)})"
        ax2.set_title(title)
    else:
        message(ax2, f"critical test: none of {', '.join(c for c, _ in crit)} in scores")

    # (3)/(4) need the paired delta baseline - C2.
    delta = None
    if baseline in by and C2 in by:
        j = pd.concat({"ref": by[baseline], "trt": by[C2]}, axis=1, join="inner").sort_index()
        j = j[np.isfinite(j.to_numpy()).all(axis=1)]
        delta = j["ref"] - j["trt"]
        if delta.empty:
            delta = None
    need = f"{baseline} and {C2}"
    if delta is not None:
        ax3.hist(delta.to_numpy(), bins=min(30, max(5, delta.size // 2)), color=GROUP_COLORS["C"], alpha=0.75,
                 edgecolor="black")
        ax3.axvline(0, color="red", linestyle="--", linewidth=2, label="0 (no effect)")
        ax3.axvline(delta.mean(), color="blue", linewidth=2, label=f"mean = {delta.mean():+.4f} (n = {delta.size})")
        ax3.set_xlabel(f"Delta NLL = {baseline} - C2 (positive = C2 better)")
        ax3.set_ylabel("Count")
        ax3.legend(fontsize=10)
        ax3.set_title("C2 (corrected truncation) vs baseline: delta distribution")
    else:
        message(ax3, f"delta histogram: needs finite pairs of {need}")

    if similarity is None:
        message(ax4, "no similarity data")
    elif delta is None:
        message(ax4, f"similarity vs delta: needs finite pairs of {need}")
    else:
        j = pd.concat({"sim": pd.Series(similarity, dtype=float), "delta": delta}, axis=1, join="inner")
        j = j[np.isfinite(j.to_numpy()).all(axis=1)]
        x, y = j["sim"].to_numpy(), j["delta"].to_numpy()
        if x.size < 3 or np.ptp(x) == 0:
            message(ax4, f"similarity vs delta: fewer than 3 usable points ({x.size})")
        else:
            ax4.scatter(x, y, alpha=0.5, s=20, color=GROUP_COLORS["C"])
            slope, intercept = np.polyfit(x, y, 1)
            xl = np.linspace(x.min(), x.max(), 100)
            ax4.plot(xl, slope * xl + intercept, "r-", linewidth=2, label="least-squares fit")
            ax4.axhline(0, color="gray", linestyle="--", alpha=0.5)
            ax4.set_xlabel("Surrogate-query cosine similarity")
            ax4.set_ylabel(f"Delta NLL = {baseline} - C2 (positive = C2 better)")
            if np.ptp(y) > 0:
                res = st.pearsonr(x, y)
                ax4.set_title(f"Similarity vs C2 benefit (r = {res.statistic:.3f}, p = {res.pvalue:.4f}, n = {x.size})")
            else:
                ax4.set_title(f"Similarity vs C2 benefit (constant delta: r undefined, n = {x.size})")
            ax4.legend(fontsize=10)
    return fig
