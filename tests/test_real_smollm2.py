"""Smoke run and identities on the real packaged model (SmolLM2-135M-Instruct, fp32, CPU).

Marked slow: it needs the asset that `make setup` fetches (about 30 s the first time).
"""

import pandas as pd
import pytest

from kvprime.builders.conditions import ConditionSpec
from kvprime.cache import hf_internals as hf
from kvprime.cache.scoring import score_without_cache
from kvprime.config.compose import compose
from kvprime.pipeline import runner

pytestmark = pytest.mark.slow

DOC = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
       "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")
QUERY = "In what country is Normandy located?"


@pytest.fixture(scope="module")
def engine():
    from kvprime import Engine

    return Engine.load("smollm2_135m_instruct")


def rel_err(a, b) -> float:
    return max(max(((ka - kb).norm() / ka.norm()).item(), ((va - vb).norm() / va.norm()).item())
               for (ka, va), (kb, vb) in zip(hf.cache_layers(a), hf.cache_layers(b), strict=True))


def test_smollm2_identities(engine):
    spec = ConditionSpec("t", surrogate="query", prefix_template="{surrogate} ")
    seg = engine.segments(spec, document=DOC, query=QUERY, answer="France", surrogate=QUERY)
    rer = engine.build(ConditionSpec("r", builder="truncate_prefix", rope_fix="rerotate", surrogate="query",
                                     prefix_template="{surrogate} "), seg)
    shift = engine.build(ConditionSpec("s", builder="truncate_prefix", rope_fix="shift", surrogate="query",
                                       prefix_template="{surrogate} "), seg)
    assert rel_err(rer.cache, shift.cache) <= 1e-5
    assert abs(engine.score(rer, seg).nll - engine.score(shift, seg).nll) <= 1e-4
    full = engine.build(spec, seg)
    ids = seg.sink + seg.prefix + seg.document + seg.prompt + seg.answer
    assert abs(engine.score(full, seg).nll - score_without_cache(engine.model, ids, len(seg.answer))) <= 1e-4
    doc_ids = seg.sink + seg.document
    at0 = engine.encode(doc_ids, list(range(len(doc_ids))))
    at20 = engine.encode(doc_ids, list(range(20, 20 + len(doc_ids))))
    assert rel_err(at0, hf.assemble(engine.model, [(at20, 0, len(doc_ids), -20)], engine.rope)) <= 1e-5


def test_smollm2_smoke_runs(tmp_path):
    for dataset, n in (("exp21_sanity", 1), ("squad_v11", 3)):
        cfg = compose([f"dataset={dataset}", f"dataset.n_samples={n}", "stats.n_boot=1000", "progress=false",
                       "save_tokens=true"])
        out = tmp_path / dataset
        results = runner.run_experiment(cfg, out)
        scores = pd.read_csv(out / "scores.csv")
        assert len(scores) == 5 * n and scores.nll.notna().all() and (scores.nll > 0).all()
        assert results["counts"]["scored_samples"] == n
        assert results["metadata"]["model"]["sink_token_ids"] == [1]  # <|im_start|>, inserted by policy
        for name in ("summary.csv", "comparisons.csv", "results.json", "report.md", "inputs.jsonl"):
            assert (out / name).exists()
        per_sample = scores.groupby("sample_id")
        assert (per_sample.apply(lambda g: g.set_index("condition").cache_len[
            ["bare", "truncated_oracle", "truncated_random"]].nunique()) == 1).all()
