"""The notebooks' suite on the tiny model: exp01's caches, routing, the report rebuilt from files."""

import numpy as np
import pandas as pd
import pytest
from fixtures.jsonl import FRANCE_PASSAGE

from kvprime.analysis import routing
from kvprime.config.compose import compose
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import plan, runner
from kvprime.reporting.finalize import finalize


@pytest.fixture()
def samples_file(river_samples):
    return river_samples(5, passage=FRANCE_PASSAGE)


def cfg_for(experiment, samples_file, tmp_path, *extra):
    return compose([f"experiment={experiment}", "model=tiny_random_llama", "dataset=jsonl",
                    f"dataset.path={samples_file}", "stats.n_boot=1000", "progress=false", "save_tokens=true",
                    "generation.max_new_tokens=8", "generation.model=null", f"generation.store={tmp_path / 'store'}",
                    *extra])


def test_routing_picks_argmax_similarity_and_oracle_is_never_worse():
    scores = pd.DataFrame([
        {"sample_id": "a", "condition": "x", "nll": 2.0, "similarity": 0.1},
        {"sample_id": "a", "condition": "y", "nll": 1.0, "similarity": 0.9},
        {"sample_id": "a", "condition": "z", "nll": 3.0, "similarity": 0.5},
        {"sample_id": "b", "condition": "x", "nll": 0.5, "similarity": 0.2},
        {"sample_id": "b", "condition": "y", "nll": 4.0, "similarity": 0.7},
        {"sample_id": "b", "condition": "z", "nll": 1.5, "similarity": 0.7},  # tie: the first in `among` wins
    ])
    rules = [{"name": "routed", "pick": "max_similarity", "among": ["x", "y", "z"]},
             {"name": "oracle", "pick": "min_nll", "among": ["x", "y", "z"]},
             {"name": "rand", "pick": "random", "among": ["x", "y", "z"]}]
    d = routing.derive(scores, rules, seed=3).set_index(["condition", "sample_id"])
    assert d.loc[("routed", "a"), "routed_to"] == "y" and d.loc[("routed", "b"), "routed_to"] == "y"
    assert d.loc[("routed", "b"), "nll"] == 4.0
    assert d.loc[("oracle", "a"), "nll"] == 1.0 and d.loc[("oracle", "b"), "nll"] == 0.5
    again = routing.derive(scores, rules, seed=3).set_index(["condition", "sample_id"])
    assert d.loc["rand"].equals(again.loc["rand"])  # the random control is seeded
    with pytest.raises(ValueError, match="pick"):
        routing.validate([{"name": "bad", "pick": "best", "among": ["x"]}], ["x"])


def test_similarity_routing_with_hand_made_embeddings(monkeypatch):
    from kvprime.models.embedder import Embedder

    vectors = {"q": [1.0, 0.0], "close": [0.8, 0.6], "far": [0.0, 1.0]}
    monkeypatch.setattr(Embedder, "embed", lambda self, texts: np.array([vectors[t] for t in texts]))
    sims = Embedder().cosine_pairs([("close", "q"), ("far", "q")])
    assert sims == pytest.approx([0.8, 0.0])


def test_exp01_builds_the_notebook_caches(tmp_path, samples_file, stub_similarity):
    results = runner.run_experiment(cfg_for("exp01", samples_file, tmp_path), tmp_path / "run")
    rows = {(r["sample_id"], r["condition"]): r for r in read_jsonl(tmp_path / "run" / "scores.jsonl")}
    r = {c: rows[("s1", c)] for s, c in rows if s == "s1"}
    doc = r["A1_baseline"]["segment_token_ids"]["document"]
    n_sink, n_doc = 1, len(doc)
    for name, row in r.items():
        seg = row["segment_token_ids"]
        if name != "A2_bare_doc":
            assert seg["document"] == doc, name  # "Document:\n{document}" identical in every condition
        kept = row["kept_segments"]
        if name.startswith(("C", "D", "E1")):
            assert kept == ["sink", "document"] and row["cache_len"] == n_sink + n_doc, name
    S = len(r["C1_trunc_generated_broken"]["segment_token_ids"]["prefix"])
    assert r["C1_trunc_generated_broken"]["cache_position_ids"][1] == n_sink + S  # uncorrected: S too far
    assert r["C2_trunc_generated_corrected"]["cache_position_ids"] == list(range(n_sink + n_doc))
    assert r["A3_baseline_offset"]["cache_position_ids"][0] == 20
    assert r["B4_full_suffix"]["kept_segments"] == ["sink", "document", "suffix"]
    assert r["D1_trunc_suffix_corrected"]["nll"] == pytest.approx(r["A1_baseline"]["nll"], abs=1e-5)
    assert r["A3_baseline_offset"]["nll"] == pytest.approx(r["A1_baseline"]["nll"], abs=1e-4)
    assert r["C2_trunc_generated_corrected"]["nll"] == pytest.approx(r["C2_trunc_generated_corrected_shift"]["nll"],
                                                                    abs=1e-4)
    assert r["B1_full_generated"]["surrogate"] == r["C2_trunc_generated_corrected"]["surrogate"]  # one surrogate
    assert r["E1_random_prefix_trunc_corrected"]["surrogate"] == r["E2_full_random_prefix"]["surrogate"]
    assert r["B3_full_static"]["surrogate"] == "What is this and what does it mean?"
    assert r["B1_full_generated"]["similarity"] is not None
    # Shared encodes: A1, A2, A3, B1/C1/C2, C2_shift, B2/C3/C4, C4_shift, B3/C5, C5_shift, B4/D1, E1/E2, E1_shift,
    # F1 (another document's surrogate) per sample, and the sink alone once for the whole run (the shift twins
    # take their sink from it). Prefix extension (batch.extend_prefixes) adds one scratch encode per opening that
    # several of them share, and those are counted apart.
    meta = results["metadata"]
    assert meta["model_encodes"] - meta["shared_openings_encoded"] == 5 * 13 + 1
    for name in ("critical", "surrogate_quality", "full_vs_truncated", "ordering", "similarity_correlation",
                 "quartiles", "numerical_floor"):
        assert (tmp_path / "run" / "analyses" / f"{name}.csv").exists()
    assert (tmp_path / "run" / "exp01_figure.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Critical test" in report and "exp01_figure.png" in report and "Cache check" in report


def test_report_command_rebuilds_the_same_summary(tmp_path, samples_file):
    out = tmp_path / "run"
    runner.run_experiment(cfg_for("exp21", samples_file, tmp_path), out)
    before = {n: (out / n).read_bytes() for n in ("summary.csv", "comparisons.csv", "scores.csv")}
    for n in before:
        (out / n).unlink()
    (out / "report.md").unlink()
    finalize(out)
    for n, data in before.items():
        assert (out / n).read_bytes() == data, n
    assert (out / "report.md").exists()


def test_routing_experiment_on_the_tiny_model(tmp_path, samples_file, stub_similarity):
    out = tmp_path / "run"
    results = runner.run_experiment(cfg_for("routing", samples_file, tmp_path), out)
    summary = pd.read_csv(out / "summary.csv").set_index("condition")
    for name in ("static_routed", "generated_routed", "static_oracle", "generated_oracle", "static_random"):
        assert summary.loc[name, "n"] == 5
    wide = pd.read_csv(out / "scores.csv").pivot(index="sample_id", columns="condition", values="nll")
    gen = [c for c in wide.columns if c.startswith("gen_") and not c.startswith("gen_other_")]  # generated_oracle's
    routed = pd.read_csv(out / "routed_scores.csv")
    oracle = routed[routed.condition == "generated_oracle"].set_index("sample_id")["nll"]
    assert (oracle <= wide[gen].min(axis=1) + 1e-12).all()  # the oracle is never worse than any single cache
    assert "routing_choices" in results["analyses"]
    # the document-specificity control routes among the other documents' surrogates, the same way
    other = routed[routed.condition == "generated_other_routed"].set_index("sample_id")
    assert set(other.routed_to) <= {c for c in wide.columns if c.startswith("gen_other_")} and len(other) == 5
    truncated = plan.plan_conditions(cfg_for("routing", samples_file, tmp_path, "experiment.cache_variant=truncated"))
    assert truncated["gen_keyword_query"].builder == "truncate_prefix" and truncated["baseline"].builder == "full"


def test_walkthrough_command(samples_file, tmp_path, capsys, stub_similarity):
    from kvprime.commands.walkthrough import walkthrough

    out = walkthrough(["sample=s2", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}",
                       "generation.max_new_tokens=8", "generation.model=null",
                       f"generation.store={tmp_path / 'store'}"])
    assert out["sample_id"] == "s2"
    sims = {c: v["similarity"] for c, v in out["caches"].items() if c.startswith("static_")}
    assert out["routes"]["static_routed"] == max(sims, key=sims.get)
    assert "token-by-token" in capsys.readouterr().out
