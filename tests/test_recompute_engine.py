"""The engine builds a chunk's recompute samples together (one selection pass and one recompute forward per batch),
and a run records the recompute's query-time work in scores.jsonl and costs.csv."""

import pandas as pd
from test_recompute import engine_for, segs, spec
from test_recompute_run import overrides

from kvprime.cache import recompute
from kvprime.config.compose import compose
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner


def test_a_chunk_recomputes_in_one_forward(monkeypatch):
    calls = []
    real = recompute.recompute_batch
    monkeypatch.setattr(recompute, "recompute_batch", lambda model, jobs: calls.append(len(jobs)) or real(model, jobs))
    eng = engine_for("llama")
    sp = spec("independent_recompute", rope_fix="rerotate", rule="first_k", k=3)
    work = [(sp, segs(seed=i)) for i in range(3)] + [(spec("joint"), segs(seed=0))]
    done = eng.run_chunk(work)
    assert calls == [3]
    for (s, seg), (pc, _) in zip(work[:3], done[:3], strict=True):
        assert pc.notes["recompute_rows"] == eng.build(s, seg).notes["recompute_rows"]


def test_a_run_counts_the_recompute_as_query_work(tmp_path):
    out = tmp_path / "run"
    runner.run_experiment(compose(overrides(tmp_path)), out)
    rows = {(r["sample_id"], r["condition"]): r for r in read_jsonl(out / "scores.jsonl")}
    for (_sid, cond), r in rows.items():
        if cond.startswith(("bare_", "gen_")):
            assert r["recompute_tokens"] > 0 and r["recompute_token_layers"] > 0 and r["recompute_s"] > 0
        else:
            assert "recompute_tokens" not in r
    row = pd.read_csv(out / "costs.csv").set_index("test").loc["bare_dev15 vs independent"]
    assert row["extra_query_gflop"] > 0 and row["recompute_gflop"] > 0 and row["extra_query_s"] > 0
    assert row["extra_index_gflop"] == 0
    assert "extra_query_gflop" in (out / "report.md").read_text()
