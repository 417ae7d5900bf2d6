"""Cost beside benefit: the FLOP count against a hand count, the cost table's arithmetic, and a tiny run's
recorded costs (tokens per condition, generation, measured seconds that add up to the chunk's)."""

import json

import numpy as np
import pandas as pd
import pytest

from kvprime.analysis import cost
from kvprime.files.results_io import read_jsonl

SHAPE = {"hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 2, "intermediate_size": 8, "vocab_size": 10}


def test_forward_flops_by_hand():
    # per token and layer: q 4*4, k 4*2, v 4*2, o 4*4 multiply-adds = 48 -> 96 FLOPs; MLP 3*4*8 = 96 -> 192
    # attention: 3 new tokens after 2 cached attend to 3+4+5 = 12 keys; 2 heads * 2 dims * 2 (scores, mix) * 2
    per_layer = 3 * (96 + 192) + 2 * 2 * 2 * 2 * 12
    assert cost.forward_flops(SHAPE, 3, 2, 1) == 2 * per_layer + 2 * 4 * 10 * 1
    # generation: prefill of 5 (1 logit), then 2 single-token steps after 5 and 6 cached
    assert cost.generation_flops(SHAPE, 5, 3) == (cost.forward_flops(SHAPE, 5, 0, 1)
                                                  + cost.forward_flops(SHAPE, 1, 5, 1)
                                                  + cost.forward_flops(SHAPE, 1, 6, 1))
    assert cost.generation_flops(SHAPE, 5, 0) == 0.0


def test_cost_table_extra_cost_and_benefit_per_tflop():
    scores = pd.DataFrame([
        {"sample_id": s, "condition": c, "encoded_tokens": e, "prompt_tokens": 4, "n_answer_tokens": 2,
         "cache_len": e, "encode_s": 0.1 * e, "score_s": 0.01, "generated_tokens": g, "generation_prompt_tokens": 7,
         "generation_s": gs}
        for s in ("a", "b") for c, e, g, gs in (("bare", 10, np.nan, np.nan), ("primed", 20, 3, 0.5))])
    costs = cost.per_score_costs(scores, SHAPE, None)
    primed = costs[costs.condition == "primed"].iloc[0]
    assert primed.index_gflop * 1e9 == pytest.approx(cost.forward_flops(SHAPE, 20) + cost.generation_flops(SHAPE, 7, 3))
    assert primed.index_s == pytest.approx(2.0 + 0.5)
    tests = pd.DataFrame([{"name": "primed vs bare", "treatment": "primed", "reference": "bare", "mean_delta": 0.1,
                           "ci_low": 0.0, "ci_high": 0.2, "verdict": "better"}])
    t = cost.cost_table(costs, tests).iloc[0]
    extra = (cost.forward_flops(SHAPE, 20) + cost.generation_flops(SHAPE, 7, 3) - cost.forward_flops(SHAPE, 10)) / 1e9
    assert t.extra_index_gflop == pytest.approx(extra)
    assert t.delta_per_index_tflop == pytest.approx(0.1 / (extra / 1e3))
    assert t.extra_index_s == pytest.approx(2.5 - 1.0)
    assert cost.worth_it(cost.cost_table(costs, tests))[0].startswith("**primed vs bare**")
    # with named comparisons, the experiment's own questions are answered, not every test vs the baseline
    both = pd.concat([tests, tests.assign(name="named: primed vs bare")], ignore_index=True)
    named = cost.worth_it(cost.cost_table(costs, both), named=1)
    assert len(named) == 1 and named[0].startswith("**named: primed vs bare**")
    # both sides generate one surrogate per document (C2 vs F1): no generation is bought, nothing to answer
    both_generate = pd.concat([tests, tests.assign(name="named", reference="primed")], ignore_index=True)
    assert cost.cost_table(costs, both_generate).extra_generated_tokens.iloc[1] == 0
    assert [w.split("**")[1] for w in cost.worth_it(cost.cost_table(costs, both_generate), named=1)] == [
        "primed vs bare"]
    none_generate = pd.concat([tests, tests.assign(name="named", treatment="bare")], ignore_index=True)
    assert cost.worth_it(cost.cost_table(costs, none_generate), named=1)[0].startswith("**primed vs bare**")
    # a routed condition builds every cache it routes among
    routed = cost.add_derived(costs, [{"name": "routed", "among": ["bare", "primed"]}])
    r = routed[routed.condition == "routed"].set_index("sample_id").loc["a"]
    both = costs[costs.sample_id == "a"]
    assert r.index_gflop == pytest.approx(both.index_gflop.sum())
    assert r.query_gflop == pytest.approx(both.query_gflop.mean())
    assert np.isnan(t.answer_gflop) and np.isnan(t.answer_s)  # this run decoded no answers


def test_answer_decoding_is_counted_as_a_generation_continuing_the_cache():
    scores = pd.DataFrame([
        {"sample_id": s, "condition": c, "encoded_tokens": 10, "prompt_tokens": 4, "n_answer_tokens": 2,
         "cache_len": 10 + k, "encode_s": 1.0, "score_s": 0.01, "generated_answer_tokens": n, "answer_s": a}
        for s in ("a", "b") for c, k, n, a in (("bare", 0, 3, 0.2), ("primed", 5, 1, 0.1))])
    costs = cost.per_score_costs(scores, SHAPE, None).set_index(["sample_id", "condition"])
    # bare: the 4 prompt tokens after 10 cached (1 logit), then 2 single-token steps after 14 and 15
    bare = (cost.forward_flops(SHAPE, 4, 10, 1) + cost.forward_flops(SHAPE, 1, 14, 1)
            + cost.forward_flops(SHAPE, 1, 15, 1))
    assert costs.loc[("a", "bare"), "answer_gflop"] * 1e9 == pytest.approx(bare)
    assert costs.loc[("a", "primed"), "answer_gflop"] * 1e9 == pytest.approx(cost.forward_flops(SHAPE, 4, 15, 1))
    assert costs.loc[("b", "bare"), "answer_tokens"] == 3 and costs.loc[("b", "bare"), "answer_s"] == 0.2
    tests = pd.DataFrame([{"name": "primed vs bare", "treatment": "primed", "reference": "bare", "mean_delta": 0.1,
                           "ci_low": 0.0, "ci_high": 0.2, "verdict": "better"}])
    t = cost.cost_table(costs.reset_index(), tests).iloc[0]
    assert t.answer_tokens == 1 and t.answer_s == pytest.approx(0.1)
    assert t.answer_gflop * 1e9 == pytest.approx(cost.forward_flops(SHAPE, 4, 15, 1))


@pytest.fixture()
def tiny_exp01(tiny_exp01_run):
    return tiny_exp01_run  # conftest's exp01 run on the tiny model, read only here


def test_a_run_records_each_conditions_cost(tiny_exp01):
    rows = pd.DataFrame(read_jsonl(tiny_exp01 / "scores.jsonl"))
    by = rows.groupby("condition")
    # the primed caches encode the surrogate too; the bare one only sink + document
    assert (by.encoded_tokens.mean()["C2_trunc_generated_corrected"] > by.encoded_tokens.mean()["A1_baseline"])
    gen = rows[rows.condition == "C2_trunc_generated_corrected"]
    assert (gen.generated_tokens > 0).all() and (gen.generation_prompt_tokens > 0).all()
    assert rows[rows.condition == "A1_baseline"].get("generated_tokens", pd.Series([np.nan])).isna().all()
    assert (rows.encode_s >= 0).all() and (rows.score_s > 0).all() and (rows.prompt_tokens > 0).all()
    meta = json.loads((tiny_exp01 / "metadata.json").read_text())
    assert meta["model_shape"]["num_hidden_layers"] == 2
    table = pd.read_csv(tiny_exp01 / "costs.csv")
    c2 = table[table.test == "C2_trunc_generated_corrected vs A1_baseline"].iloc[0]
    assert c2.extra_index_gflop > 0 and c2.generated_tokens > 0
    summary = pd.read_csv(tiny_exp01 / "summary.csv").set_index("condition")
    assert summary.loc["C2_trunc_generated_corrected", "extra_index_gflop"] == pytest.approx(c2.extra_index_gflop)
    assert "## Cost beside benefit" in (tiny_exp01 / "report.md").read_text()


def test_the_report_judges_its_generated_surrogates(tiny_exp01):
    table = pd.read_csv(tiny_exp01 / "generated_surrogates.csv")
    # one row per source: the six conditions of generated:exp01 share one text per sample
    assert list(table.source) == ["generated:exp01", "generated_other:exp01"]
    assert "C2_trunc_generated_corrected" in table.conditions.iloc[0] and (table.n == 4).all()
    results = json.loads((tiny_exp01 / "results.json").read_text())
    gen = results["generated_surrogates"]
    assert gen["generator"]["model"] == "tiny_random_llama"
    # a random 2-layer model writes no queries (a few bytes of noise): the report must say so, for its own source
    # only (generated_other repeats those texts and gets no warnings of its own)
    assert gen["warnings"] and all(w.startswith("generated:exp01 ") for w in gen["warnings"])
    assert "Warning: degenerate surrogates" in (tiny_exp01 / "report.md").read_text()
