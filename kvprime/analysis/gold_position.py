"""Answer accuracy by where the gold evidence sits: by the gold document's slot and by the fact's depth in it.

Each sample's inputs record where its evidence is (``kvprime.data.types.Sample``): ``gold_slots`` (every gold
document, evidence order) and, for the synthetic tasks, ``task_info.facts`` (per fact its slot, relative depth
and role). A sample counts once per gold fact: a two-hop sample in its pointer's document (role ``hop1``) and
in its code's document (``hop2``), so both gold documents have their rows; a key-value sample once (``gold``), a
needle sample once (``needle``). Samples without fact positions (the multi-hop formats) count once per gold
slot (role ``evidence<j>``, or ``gold`` for a single one), with no depth.

Per condition and group: ``n`` samples, exact match and contains (the share of answers scoring 1, with the
Wilson score interval at the run's confidence: statsmodels ``proportion_confint(method="wilson")``) and the mean
answer NLL. A run without the answer metric has NaN accuracy. Depth is binned in ``DEPTH_BINS`` equal bins of
[0, 1] (1 falls in the last).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from statsmodels.stats.proportion import proportion_confint

from .drawing import message
from .registry import AnalysisInput, AnalysisResult, FigureSpec, register_analysis

NAME = "accuracy_by_position"
SLOT_TABLE, DEPTH_TABLE = "accuracy_by_slot", "accuracy_by_depth"
FIGURE = "accuracy_by_position.png"
TITLES = {SLOT_TABLE: "Answer accuracy by the gold document's slot (each gold fact's document; two-hop: both)",
          DEPTH_TABLE: "Answer accuracy by the gold fact's relative depth in its document"}
GOLD_ROLES = ("gold", "hop1", "hop2", "needle")
DEPTH_BINS = 5
METRICS = ("exact_match", "contains")
SHORT = {"exact_match": "em", "contains": "contains"}


def gold_facts(record: Mapping) -> list[dict]:
    """One row per gold fact of a sample's inputs record: role, slot and relative depth (None: not recorded)."""
    info = record.get("task_info") or {}
    facts = [f for f in info.get("facts") or () if f.get("role") in GOLD_ROLES]
    if facts:
        return [{"role": f["role"], "slot": int(f["slot"]), "depth": f.get("depth")} for f in facts]
    slots = record.get("gold_slots") or ([record["gold_slot"]] if record.get("gold_slot") is not None else [0])
    roles = ["gold"] if len(slots) == 1 else [f"evidence{j + 1}" for j in range(len(slots))]
    return [{"role": r, "slot": int(s), "depth": None} for r, s in zip(roles, slots, strict=True)]


def depth_bin(depth: float) -> int:
    return min(int(float(depth) * DEPTH_BINS), DEPTH_BINS - 1)


def positions(inputs: Sequence[Mapping]) -> pd.DataFrame:
    """sample_id, role, slot, depth, depth_bin: one row per gold fact of every sample."""
    rows = [{"sample_id": r["sample_id"], **f} for r in inputs for f in gold_facts(r)]
    frame = pd.DataFrame(rows, columns=["sample_id", "role", "slot", "depth"])
    frame["depth_bin"] = [depth_bin(d) if d is not None and not pd.isna(d) else np.nan for d in frame["depth"]]
    return frame


def _share(values: pd.Series, confidence: float) -> tuple[float, float, float]:
    """The share of 1s among the non-missing values and its Wilson interval (NaN when none is scored)."""
    values = values.dropna().astype(float)
    if not len(values):
        return (np.nan, np.nan, np.nan)
    hits = int(values.sum())
    low, high = proportion_confint(hits, len(values), alpha=1 - confidence, method="wilson")
    # clamped: statsmodels' interval can step outside [0, 1] by float rounding at 0 or n hits
    return (hits / len(values), max(0.0, float(low)), min(1.0, float(high)))


def _aggregate(joined: pd.DataFrame, by: list[str], confidence: float) -> pd.DataFrame:
    rows = []
    for key, group in joined.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row["n"] = len(group)
        for metric in METRICS:
            short = SHORT[metric]
            column = group[metric] if metric in group else pd.Series(dtype=float)
            row[short], row[f"{short}_ci_low"], row[f"{short}_ci_high"] = _share(column, confidence)
        row["mean_nll"] = float(group["nll"].astype(float).mean())
        rows.append(row)
    shares = [f"{SHORT[m]}{end}" for m in METRICS for end in ("", "_ci_low", "_ci_high")]
    return pd.DataFrame(rows, columns=[*by, "n", *shares, "mean_nll"])


def _joined(run: AnalysisInput) -> pd.DataFrame:
    """Every (condition, sample) score beside each of the sample's gold facts, in run order."""
    where = positions(run.inputs)
    cols = ["sample_id", "condition", "nll", *[m for m in METRICS if m in run.scores]]
    return run.scores[cols].merge(where, on="sample_id", how="inner", sort=False)


def _in_run_order(frame: pd.DataFrame, conditions: list[str], key: str) -> pd.DataFrame:
    """Rows by the run's condition order, then role and ``key``."""
    if not len(frame):
        return frame
    rank = {c: i for i, c in enumerate(conditions)}
    order = frame.assign(_rank=frame["condition"].map(rank)).sort_values(["_rank", "role", key], kind="stable")
    return order.drop(columns="_rank").reset_index(drop=True)


def tables(run: AnalysisInput) -> dict[str, pd.DataFrame]:
    joined = _joined(run)
    conditions = list(dict.fromkeys(run.scores["condition"]))
    by_slot = _aggregate(joined, ["condition", "role", "slot"], run.confidence)
    depth = joined.dropna(subset=["depth_bin"]).astype({"depth_bin": int})
    by_depth = _aggregate(depth, ["condition", "role", "depth_bin"], run.confidence)
    if len(by_depth):
        by_depth.insert(3, "depth_low", by_depth["depth_bin"] / DEPTH_BINS)
        by_depth.insert(4, "depth_high", (by_depth["depth_bin"] + 1) / DEPTH_BINS)
    return {SLOT_TABLE: _in_run_order(by_slot, conditions, "slot"),
            DEPTH_TABLE: _in_run_order(by_depth, conditions, "depth_bin")}


def draw(by_slot: pd.DataFrame, by_depth: pd.DataFrame, *, title: str):
    """Exact match (Wilson CI) by slot (left) and by depth bin (right): a colour per condition, a line style per
    gold role (two-hop: hop1 dashed, hop2 solid); conditions are set slightly apart so equal values stay visible."""
    # lazy: matplotlib; the analysis registry imports this module where only tables are wanted
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    axes = fig.subplots(1, 2)
    fig.suptitle(title, fontsize=13)
    styles = {"hop1": "--", "evidence1": "--"}
    for ax, frame, x, label in ((axes[0], by_slot, "slot", "gold document's slot"),
                                (axes[1], by_depth, "depth_bin", "gold fact's relative depth (bin)")):
        if not len(frame) or frame["em"].isna().all():
            message(ax, "no exact-match scores (metrics: [nll, answer]) or no positions recorded")
            continue
        conditions = list(dict.fromkeys(frame["condition"]))
        several_roles = frame["role"].nunique() > 1
        for (condition, role), g in frame.groupby(["condition", "role"], sort=False):
            i = conditions.index(condition)
            y = g["em"].to_numpy(float)
            # clipped: at 0 or n hits the interval's end and the share differ by float rounding only
            err = np.clip(np.vstack([y - g["em_ci_low"].to_numpy(float), g["em_ci_high"].to_numpy(float) - y]), 0, None)
            shift = (i - (len(conditions) - 1) / 2) * 0.04
            ax.errorbar(g[x].to_numpy(float) + shift, y, yerr=np.nan_to_num(err), marker="o", capsize=3,
                        color=colormaps["tab10"](i % 10), linestyle=styles.get(role, "-"),
                        label=f"{condition} ({role})" if several_roles else condition)
        if x == "depth_bin":
            ticks = range(DEPTH_BINS)
            ax.set_xticks(list(ticks), [f"{b / DEPTH_BINS:.1f}-{(b + 1) / DEPTH_BINS:.1f}" for b in ticks])
        else:
            ax.set_xticks(sorted(frame[x].unique()))
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(label)
        ax.set_ylabel("exact match (95% Wilson CI)")
        ax.legend(fontsize=8, loc="best")
    return fig


@register_analysis(NAME)
def accuracy_by_position(run: AnalysisInput) -> AnalysisResult:
    """Exact match and contains per condition by the gold document's slot and the gold fact's depth (Wilson CIs)."""
    out = tables(run)
    name = run.experiment.get("name", "run")

    def figure():
        return draw(out[SLOT_TABLE], out[DEPTH_TABLE], title=f"{name}: exact match by gold slot and depth")

    return AnalysisResult(out, dict(TITLES), {NAME: FigureSpec(FIGURE, figure)})
