"""experiment=multidoc end to end on the tiny random model: k passages per sample through the Session, one
generated surrogate per passage for independent_primed, samples that do not fit skipped and counted."""

import json

import pytest
from fixtures.jsonl import write_jsonl

from kvprime.config.compose import compose
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner
from kvprime.pipeline.session import Session


def _data(tmp_path, n=6):
    rows = [{"id": f"s{i}", "article": f"art{i % 2}",
             "passage": f"The river number {i} flows through the old city of France and into the sea near the "
                        f"tower {i}. Boats carry grain along it.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(n)]
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, rows)
    return path


def overrides(tmp_path, *extra):
    return ["experiment=multidoc", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={_data(tmp_path)}",
            "stats.n_boot=1000", "progress=false", "generation.model=null", "generation.max_new_tokens=6",
            f"generation.store={tmp_path / 'store'}", *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multidoc")
    out = tmp / "run"
    runner.run_experiment(compose(overrides(tmp)), out)
    return out, tmp


def test_run_records_the_passages_and_gold_slot_and_scores_every_condition(run_dir):
    out, _ = run_dir
    inputs = read_jsonl(out / "inputs.jsonl")
    assert len(inputs) == 6
    for r in inputs:
        assert len(r["passages"]) == 3 and r["passages"][r["gold_slot"]] == r["passage"]
    scores = read_jsonl(out / "scores.jsonl")
    names = {"joint", "independent", "primed_static", "primed_generated", "primed_query", "primed_random"}
    assert {(r["sample_id"], r["condition"]) for r in scores} == {(r["sample_id"], n) for r in inputs for n in names}
    by = {(r["sample_id"], r["condition"]): r for r in scores}
    for r in inputs:  # joint and independent hold the same entries: the sinks of documents 2..k are dropped
        assert by[(r["sample_id"], "joint")]["cache_len"] == by[(r["sample_id"], "independent")]["cache_len"]
        assert by[(r["sample_id"], "primed_generated")]["generation_prompt_tokens"] > 0
    results = json.loads((out / "results.json").read_text())
    names_done = {c["name"] for c in results["comparisons"]}
    assert "generated vs static priming" in names_done and "independent vs joint: what independent caching costs" \
        in names_done


def test_every_passage_gets_its_own_generated_surrogate(run_dir):
    _, tmp = run_dir
    session = Session.from_overrides(overrides(tmp))
    sample = session.samples[0]
    seg = session.segments(sample)["primed_generated"]
    assert [s.name for s in seg.spans] == ["sink", "prefix_0", "document_0", "prefix_1", "document_1", "prefix_2",
                                           "document_2"]
    spec = session.specs["primed_generated"]
    for i, passage in enumerate(sample.passages):
        text = session.surrogate_service.generated[("target_question", passage)]
        want = session.tokenizer(spec.prefix_template.format(surrogate=text), add_special_tokens=False)["input_ids"]
        assert list(seg.spans[1 + 2 * i].ids) == want
    # the gold passage's surrogate is the sample's own (what the records and the quality table show)
    gold = session.surrogate_service.generated[("target_question", sample.passage)]
    assert session.surrogates(sample)["primed_generated"] == gold
    # the cost of priming every passage is the sum of their generations, as scores.jsonl records it
    total = session.surrogate_service.generation_cost(spec, sample)["prompt_tokens"]
    gold_only = session.surrogate_service.document_cost("target_question", sample.passage)["prompt_tokens"]
    row = next(r for r in read_jsonl(run_dir[0] / "scores.jsonl")
               if r["sample_id"] == sample.sample_id and r["condition"] == "primed_generated")
    assert total == row["generation_prompt_tokens"] and gold_only < total < 4 * gold_only
    # a static surrogate is one text before all documents
    static = session.segments(sample)["primed_static"]
    assert [s.name for s in static.spans] == ["sink", "prefix", "document_0", "document_1", "document_2"]


def test_a_context_that_does_not_fit_is_skipped_and_counted(tmp_path):
    out = tmp_path / "run"
    # one passage and its question fit in 150 positions (111 tokens on the tiny tokenizer) ...
    runner.run_experiment(compose(overrides(tmp_path, "model.max_context=150", "multidoc.k=1")), out)
    meta = json.loads((out / "metadata.json").read_text())
    assert not meta["skipped"] and len(read_jsonl(out / "inputs.jsonl")) == 6
    # ... three passages do not: every sample is skipped with its reason, and the run says so
    with pytest.raises(runner.RunError, match="all 6 selected samples were skipped .*needs 2.. tokens"):
        runner.run_experiment(compose(overrides(tmp_path, "model.max_context=150", "multidoc.k=3")), tmp_path / "r3")


def test_prefix_extension_and_batching_change_no_number(run_dir):
    out, tmp = run_dir
    other = tmp / "extended"
    runner.run_experiment(compose(overrides(tmp, "batch.extend_prefixes=true", "batch.samples=4",
                                            "batch.encode_tokens=512")), other)
    a = {(r["sample_id"], r["condition"]): r["nll"] for r in read_jsonl(out / "scores.jsonl")}
    b = {(r["sample_id"], r["condition"]): r["nll"] for r in read_jsonl(other / "scores.jsonl")}
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-4
