"""The recompute-to-parity analysis on made-up scores whose gaps to joint are known: the curve's paired gaps, the
smallest share shown equivalent, "not reached" with the MDE, and refusals of a bad ``experiment.parity``."""

import numpy as np
import pandas as pd
import pytest

from kvprime.analysis.recompute_parity import recompute_parity
from kvprime.analysis.registry import AnalysisInput
from kvprime.errors import ConfigError

PARITY = {"reference": "joint",
          "inputs": {"independent": {"independent": 0.0, "dev05": 0.05, "dev30": 0.3},
                     "primed": {"primed": 0.0, "pdev30": 0.3}}}
GAPS = {"independent": 0.5, "dev05": 0.2, "dev30": 0.001, "primed": 0.4, "pdev30": 0.1}


def run(parity=PARITY, n=40, answers=False):
    rng = np.random.default_rng(0)
    joint = rng.normal(2.0, 0.5, n)
    rows = [{"sample_id": f"s{i}", "condition": "joint", "nll": joint[i]} for i in range(n)]
    for cond, gap in GAPS.items():
        rows += [{"sample_id": f"s{i}", "condition": cond, "nll": joint[i] + gap + rng.normal(0, 0.002)}
                 for i in range(n)]
    scores = pd.DataFrame(rows)
    if answers:
        scores["f1"] = 1.0 - scores["condition"].map(GAPS).fillna(0.0)
    return AnalysisInput(scores=scores, similarity=None, baseline="independent", seed=0, n_boot=1000, alpha=0.05,
                         confidence=0.95, experiment={"parity": parity}, equivalence_margin=0.02)


def test_the_curve_and_the_smallest_share_at_parity():
    res = recompute_parity(run())
    curve = res.tables["recompute_curve"].set_index("condition")
    for cond, gap in GAPS.items():
        assert curve.loc[cond, "mean_gap"] == pytest.approx(gap, abs=2e-3)
        assert curve.loc[cond, "ci_low"] <= curve.loc[cond, "mean_gap"] <= curve.loc[cond, "ci_high"]
    assert list(curve["equivalent"]) == [False, False, True, False, False]
    parity = res.tables["recompute_parity"].set_index("input")
    assert parity.loc["independent", "parity_share"] == 0.3 and parity.loc["independent", "condition"] == "dev30"
    assert np.isnan(parity.loc["primed", "parity_share"])
    assert parity.loc["primed", "finding"].startswith("not reached at this n (n=40; at share 0.3 the gap is +0.09")


@pytest.mark.parametrize("answers", [False, True])
def test_the_figure_draws(answers):
    fig = recompute_parity(run(answers=answers)).figures["recompute_parity_figure"].draw()
    assert len(fig.axes) == 2
    assert fig.axes[1].get_title() == ("Answer quality" if answers else "")


@pytest.mark.parametrize("parity, says", [("joint", "needs `reference"),
                                          ({"reference": "nope", "inputs": {"a": {"dev05": 0.1}}}, "reference='nope'"),
                                          ({"reference": "joint", "inputs": {"a": {"dev05": 2}}}, "got 2")])
def test_a_bad_declaration_is_refused(parity, says):
    with pytest.raises(ConfigError, match=says):
        recompute_parity(run(parity=parity))
