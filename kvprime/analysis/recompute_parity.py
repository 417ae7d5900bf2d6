"""Recompute to parity (``experiment.analyses: recompute_parity``): per input cache, the NLL gap to the joint cache
against the share of the cache recomputed, and the smallest share whose gap is shown equivalent to joint.

Its curves are an experiment's declaration (``experiment.parity``, below); without one, those of
``experiment=blend`` (``BLEND``: its deviation arms on the bare and the generated-primed caches)::

    parity:
      reference: joint                 # the full prefill every arm is measured against
      inputs:                          # per input cache: condition -> share of candidate rows recomputed
        independent: {independent: 0.0, bare_dev05: 0.05, bare_dev15: 0.15, bare_dev30: 0.30}

For every (input, condition): the paired gap = condition NLL - reference NLL (positive: worse than joint) with the
run's bootstrap CI (``stats.paired_test``, seeded per test from the run seed), the TOST p-value against the run's
equivalence margin and the MDE. An input reaches parity at the smallest share whose TOST p is below alpha (its gap
is within +-margin); otherwise "not reached at this n", with the MDE of its largest share. The figure plots the
gap against the share, one line per input with its CI shaded, and, where the scores carry answer quality
(``f1``/``contains``), the mean answer F1 per share in a second panel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .drawing import message
from .registry import AnalysisInput, AnalysisResult, FigureSpec, register_analysis
from .stats import _derive_seed, paired_test

CURVE, PARITY = "recompute_curve", "recompute_parity"
COLUMNS = ("input", "condition", "share", "n", "mean_gap", "ci_low", "ci_high", "p_tost", "equivalent", "mde")


BLEND = {"reference": "joint",
         "inputs": {"independent": {"independent": 0.0, "bare_dev05": 0.05, "bare_dev15": 0.15, "bare_dev30": 0.30},
                    "primed_generated": {"primed_generated": 0.0, "gen_dev05": 0.05, "gen_dev15": 0.15,
                                         "gen_dev30": 0.30}}}


def _declared(run: AnalysisInput) -> tuple[str, dict[str, dict[str, float]]]:
    spec = run.experiment.get("parity", BLEND)
    where = "experiment.parity"
    if not isinstance(spec, Mapping) or not isinstance(spec.get("inputs"), Mapping) or not spec.get("reference"):
        raise ConfigError(f"{where}: analysis recompute_parity needs `reference: <condition>` and `inputs: {{<input>: "
                          f"{{<condition>: <share>, ...}}}}`, got {spec!r}.")
    names = set(run.scores["condition"])
    inputs = {}
    for name, curve in spec["inputs"].items():
        if not isinstance(curve, Mapping) or not curve:
            raise ConfigError(f"{where}.inputs.{name}: a mapping of condition -> share, got {curve!r}.")
        for cond, share in curve.items():
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
                raise ConfigError(f"{where}.inputs.{name}.{cond}: the share recomputed, a number from 0 to 1; got "
                                  f"{share!r}.")
        inputs[str(name)] = {str(c): float(s) for c, s in curve.items() if c in names}
    if spec["reference"] not in names:
        raise ConfigError(f"{where}.reference={spec['reference']!r} is not a condition of this run "
                          f"({', '.join(sorted(names))}).")
    return str(spec["reference"]), inputs


def _curve(run: AnalysisInput, reference: str, inputs) -> pd.DataFrame:
    nll = run.scores.pivot_table(index="sample_id", columns="condition", values="nll", aggfunc="first")
    rows = []
    for name, curve in inputs.items():
        for cond, share in sorted(curve.items(), key=lambda kv: kv[1]):
            both = nll[[cond, reference]].dropna()
            # delta = reference - treatment with the arm as reference: the arm's gap above joint
            t = paired_test(both[cond], both[reference], n_boot=run.n_boot, confidence=run.confidence,
                            seed=_derive_seed(run.seed, f"{cond} vs {reference} (parity)"),
                            tie_tolerance=run.tie_tolerance, margin=run.equivalence_margin, alpha=run.alpha,
                            power=run.power)
            rows.append({"input": name, "condition": cond, "share": share, "n": t["n"], "mean_gap": t["mean_delta"],
                         "ci_low": t["ci_low"], "ci_high": t["ci_high"], "p_tost": t["p_tost"],
                         "equivalent": bool(t["p_tost"] < run.alpha),  # NaN (no test) compares False
                         "mde": t["mde"]})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _parity(curve: pd.DataFrame, margin: float) -> pd.DataFrame:
    rows = []
    for name, part in curve.groupby("input", sort=False):
        hit = part[part["equivalent"]].sort_values("share")
        last = part.sort_values("share").iloc[-1]
        if len(hit):
            first = hit.iloc[0]
            rows.append({"input": name, "parity_share": first["share"], "condition": first["condition"],
                         "finding": f"gap within +-{margin:g} nats of joint from share {first['share']:g} "
                                    f"({first['condition']})"})
        else:
            rows.append({"input": name, "parity_share": math.nan, "condition": None,
                         "finding": f"not reached at this n (n={last['n']}; at share {last['share']:g} the gap is "
                                    f"{last['mean_gap']:+.4f} nats, MDE {last['mde']:.4f})"})
    return pd.DataFrame(rows, columns=["input", "parity_share", "condition", "finding"])


def _answers(scores: pd.DataFrame, inputs) -> pd.DataFrame | None:
    metric = next((m for m in ("f1", "contains") if m in scores), None)
    if metric is None:
        return None
    mean = scores.groupby("condition")[metric].mean()
    rows = [{"input": name, "share": share, metric: mean.get(cond, np.nan)}
            for name, curve in inputs.items() for cond, share in curve.items()]
    return pd.DataFrame(rows).sort_values(["input", "share"]).assign(metric=metric)


def draw(curve: pd.DataFrame, answers: pd.DataFrame | None, margin: float):
    from matplotlib.figure import (
        Figure,  # lazy: the registry imports this module where only tables are wanted
    )

    fig = Figure(figsize=(12, 5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name, part in curve.groupby("input", sort=False):
        part = part.sort_values("share")
        line, = ax1.plot(part["share"], part["mean_gap"], marker="o", label=name)
        ax1.fill_between(part["share"], part["ci_low"], part["ci_high"], color=line.get_color(), alpha=0.2)
    ax1.axhspan(-margin, margin, color="#999999", alpha=0.15, label=f"equivalence margin +-{margin:g}")
    ax1.axhline(0, color="black", lw=0.8)
    ax1.set(xlabel="share of the cache recomputed", ylabel="NLL gap to joint (nats)", title="Recompute to parity")
    ax1.legend()
    if answers is None or answers.empty:
        message(ax2, "no answer quality in this run's scores")
    else:
        metric = answers["metric"].iloc[0]
        for name, part in answers.groupby("input", sort=False):
            ax2.plot(part["share"], part[metric], marker="o", label=name)
        ax2.set(xlabel="share of the cache recomputed", ylabel=f"mean answer {metric}", title="Answer quality")
        ax2.legend()
    return fig


@register_analysis("recompute_parity")
def recompute_parity(run: AnalysisInput) -> AnalysisResult:
    """NLL gap to joint against the share recomputed, per input cache; the smallest share at parity."""
    reference, inputs = _declared(run)
    curve = _curve(run, reference, inputs)
    parity = _parity(curve, run.equivalence_margin)
    answers = _answers(run.scores, inputs)
    return AnalysisResult(
        {CURVE: curve, PARITY: parity},
        titles={CURVE: f"Recompute to parity: NLL gap to {reference} per share recomputed (paired, bootstrap CI)",
                PARITY: "Smallest share recomputed whose gap is shown equivalent to joint (TOST)"},
        figures={"recompute_parity_figure": FigureSpec("recompute_parity.png",
                                                       lambda: draw(curve, answers, run.equivalence_margin))})
