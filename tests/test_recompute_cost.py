"""Selective recompute's cost is query-time work: the builder's counts, the FLOP count against forward_flops, and
costs.csv's columns (the recompute added to the query side, never to indexing)."""

import numpy as np
import pandas as pd
import pytest
from test_recompute import engine_for, segs, spec

from kvprime.analysis import cost

SHAPE = {"hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 2, "intermediate_size": 8, "vocab_size": 10}


def test_recompute_flops_by_hand():
    # per token and layer 96 + 192 FLOPs (test_cost's hand count); per (query, key) pair 2 heads * 2 dims * 2 * 2
    assert cost.recompute_flops(SHAPE, 5, 12) == 5 * (96 + 192) + 16 * 12


def test_a_trailing_recompute_costs_a_forward_of_those_tokens_after_the_rest():
    """``all`` on a bare independent cache recomputes every row after the first document: the same work as a forward
    of those tokens continuing the cache before them (no LM head)."""
    eng = engine_for("llama")
    pc = eng.build(spec("independent_recompute", rope_fix="rerotate", rule="all"), segs())
    work, n = pc.notes["query_work"], len(pc.token_ids)
    s = len(pc.notes["recompute_rows"])
    assert pc.notes["recompute_rows"] == list(range(n - s, n))
    shape = cost.model_shape(eng.model.config)
    got = cost.recompute_flops(shape, work["recompute_token_layers"] + work["selection_token_layers"],
                               work["recompute_key_pairs"])
    assert got == cost.forward_flops(shape, s, n - s)


def _scores():
    rows = []
    for sid in ("a", "b"):
        base = {"sample_id": sid, "encoded_tokens": 40, "prompt_tokens": 4, "n_answer_tokens": 2, "cache_len": 38,
                "encode_s": 1.0, "score_s": 0.01}
        rows.append({**base, "condition": "independent"})
        rows.append({**base, "condition": "blend", "recompute_tokens": 6, "selection_token_layers": 76,
                     "recompute_token_layers": 12, "recompute_key_pairs": 2 * 150 + 2 * 741, "recompute_s": 0.2})
    return pd.DataFrame(rows)


def test_costs_count_the_recompute_as_query_work():
    costs = cost.per_score_costs(_scores(), SHAPE, None)
    blend = costs[costs.condition == "blend"].iloc[0]
    plain = costs[costs.condition == "independent"].iloc[0]
    extra = cost.recompute_flops(SHAPE, 76 + 12, 2 * 150 + 2 * 741) / 1e9
    assert blend.recompute_gflop == pytest.approx(extra) and plain.recompute_gflop == 0
    assert blend.index_gflop == plain.index_gflop and blend.index_s == plain.index_s  # not indexing work
    assert blend.query_gflop == pytest.approx(plain.query_gflop + extra)
    assert blend.query_s == pytest.approx(0.21) and blend.recompute_tokens == 6
    tests = pd.DataFrame([{"name": "blend vs independent", "treatment": "blend", "reference": "independent",
                           "mean_delta": 0.1, "ci_low": 0.0, "ci_high": 0.2, "verdict": "better"}])
    t = cost.cost_table(costs, tests).iloc[0]
    assert t.extra_query_gflop == pytest.approx(extra) and t.extra_query_s == pytest.approx(0.2)
    assert t.extra_index_gflop == 0 and np.isnan(t.delta_per_index_tflop)
    assert t.recompute_gflop == pytest.approx(extra)
    routed = cost.add_derived(costs, [{"name": "routed", "among": ["independent", "blend"]}])
    assert routed[routed.condition == "routed"].recompute_gflop.iloc[0] == pytest.approx(extra / 2)


def test_runs_without_recompute_columns_cost_what_they_did():
    scores = _scores()
    scores = scores[scores.condition == "independent"].dropna(axis=1)
    costs = cost.per_score_costs(scores, SHAPE, None)
    assert (costs.recompute_gflop == 0).all() and (costs.recompute_s == 0).all()
    assert costs.query_gflop.iloc[0] == pytest.approx(cost.forward_flops(SHAPE, 6, 38, 3) / 1e9)
    assert costs.query_s.iloc[0] == 0.01
