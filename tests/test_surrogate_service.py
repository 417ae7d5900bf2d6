"""Surrogates as one service: a source declares what it needs and gets exactly that; a new source, one that needs the
generator or one that needs another sample, is one plugin module plus its use in a condition; the store is read
through one key for a text and its cost; the run's donors are computed once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fixtures.jsonl import write_jsonl

from kvprime.errors import ConfigError
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline.session import Session
from kvprime.surrogates import sources

N = 4
PLUGIN = '''"""Two sources of a study: one needs the generator, one another sample."""

from kvprime.surrogates.sources import register_source


@register_source("generated_reversed", arg="<template>", needs=("generated",))
def generated_reversed(sample, ctx, arg):
    """The generated text of the document, reversed word by word."""
    return " ".join(reversed(ctx.generated.split()))


@register_source("donor_query", needs=("donor",))
def donor_query(sample, ctx, arg):
    """The query of the sample's donor (another selected sample)."""
    return ctx.donor.query
'''
CONDITION = """builder: truncate_prefix
rope_fix: rerotate
surrogate: {surrogate}
prefix_template: "This document may be relevant to queries like: {{surrogate}}\\n\\n"
document_template: "Document:\\n{{document}}"
prompt_template: "\\n\\nQuery: {{query}}\\n\\nAnswer:"
answer_template: " {{answer}}"
"""


def _rows(n: int = N) -> list[dict]:
    return [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city of France and into the sea "
                                       f"near the tower {i}. Boats carry grain along it.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(n)]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, _rows())
    return path


@pytest.fixture()
def overrides(tmp_path, data_file):
    return ["experiment=exp21", "+condition/routing@conditions.gen_keyword_query=gen_keyword_query",
            "+condition/routing@conditions.gen_other_keyword_query=gen_other_keyword_query",
            "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data_file}", f"dataset.n_samples={N}",
            "progress=false", "generation.model=null", "generation.max_new_tokens=4",
            f"generation.store={tmp_path / 'store'}", "stats.n_boot=1000"]


@pytest.fixture()
def study_sources():
    yield
    for name in ("generated_reversed", "donor_query"):
        sources.SOURCE_REGISTRY.unregister(name)


def test_plugin_sources_that_need_the_generator_or_another_sample_run_with_no_edit_to_kvprime(
        tmp_path, overrides, monkeypatch, capsys, study_sources):
    from kvprime.commands.app import run_hydra_app

    study = tmp_path / "study"
    (study / "condition").mkdir(parents=True)
    (study / "kvp_service_plug.py").write_text(PLUGIN)
    for name, surrogate in (("reversed", "generated_reversed:keyword_query"), ("donor_query", "donor_query")):
        (study / "condition" / f"{name}.yaml").write_text(CONDITION.format(surrogate=surrogate))
    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = run_hydra_app(["--config-dir", str(study), "plugins=[kvp_service_plug]", *overrides,
                          "+condition@conditions.reversed=reversed", "+condition@conditions.donor_query=donor_query",
                          f"hydra.run.dir={run_dir}"])
    assert code == 0, capsys.readouterr().err

    inputs = {r["sample_id"]: r for r in read_jsonl(run_dir / "inputs.jsonl")}
    queries = {sid: r["query"] for sid, r in inputs.items()}
    donors = sources.derangement([SimpleNamespace(sample_id=r["id"], passage=r["passage"]) for r in _rows()], 42)
    for sid, r in inputs.items():
        texts = r["surrogates"]
        assert texts["gen_keyword_query"].split() and texts["reversed"] == " ".join(
            reversed(texts["gen_keyword_query"].split()))
        # One derangement for the run: the donor whose query donor_query takes is generated_other's donor.
        assert texts["donor_query"] == queries[donors[sid]] != queries[sid]
        assert texts["gen_other_keyword_query"] == inputs[donors[sid]]["surrogates"]["gen_keyword_query"]
    scores = {(r["sample_id"], r["condition"]): r for r in read_jsonl(run_dir / "scores.jsonl")}
    for sid in inputs:
        # A generating source's row carries what generating cost; a source that generates nothing has none.
        assert scores[(sid, "reversed")]["generation_prompt_tokens"] == \
            scores[(sid, "gen_keyword_query")]["generation_prompt_tokens"] > 0
        assert scores[(sid, "reversed")]["surrogate"] == inputs[sid]["surrogates"]["reversed"]
        assert "generation_prompt_tokens" not in scores[(sid, "donor_query")]


def test_the_donors_are_computed_once_per_run(overrides, monkeypatch):
    calls = []
    real = sources.derangement
    monkeypatch.setattr(sources, "derangement", lambda *a, **k: calls.append(1) or real(*a, **k))
    session = Session.from_overrides(overrides)
    service = session.surrogate_service
    texts = session.resolved()
    assert len(calls) == 1  # by the plan, before any model loaded
    by_id = {s.sample_id: s for s in session.samples}
    for sid, donor in service.donors.items():
        assert texts[sid]["gen_other_keyword_query"] == texts[donor]["gen_keyword_query"]
        assert service.donor(by_id[sid]) is by_id[donor]
    assert session.plan.surrogate_sources.donors == service.donors


def test_a_stored_text_and_its_cost_come_from_one_entry(overrides, monkeypatch):
    """What the store holds under the service's key is both the text a run reads and the cost its rows record."""
    from kvprime.surrogates import generation
    from kvprime.surrogates.generation import GENERATION_TEMPLATES

    first = Session.from_overrides(overrides)
    sample = first.samples[0]
    service = first.surrogate_service
    key = service.store.key(model_id=service.generator.model_id, template_name="keyword_query",
                            template_text=GENERATION_TEMPLATES["keyword_query"], settings=service.generation_settings,
                            document=sample.passage)
    service.store.put(key, "which river reaches the sea", {"model_id": service.generator.model_id,
                                                           "prompt_tokens": 11, "shared_prompt_tokens": 3,
                                                           "generated_tokens": 5, "seconds": 0.5})
    again = Session.from_overrides(overrides)
    service = again.surrogate_service
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("generated although stored"))
    spec = again.specs["gen_keyword_query"]
    assert not service.known(spec, sample)
    assert again.surrogates(sample, ["gen_keyword_query"]) == {"gen_keyword_query": "which river reaches the sea"}
    assert service.known(spec, sample)
    cost = service.generation_cost(spec, sample)
    assert (cost["prompt_tokens"], cost["shared_prompt_tokens"], cost["generated_tokens"]) == (11, 3, 5)
    assert service.generation_cost(again.specs["gen_other_keyword_query"], sample) == cost
    assert service.generation_cost(again.specs["bare"], sample) is None  # generates nothing


def test_a_resolver_gets_what_it_declared_and_nothing_else(study_sources):
    @sources.register_source("donor_query", needs=("seed",))
    def reads_too_much(sample, ctx, arg):
        return ctx.pool[0]

    s = SimpleNamespace(sample_id="a", query="why", passage="p")
    with pytest.raises(ConfigError, match=r"reads ctx.pool, which its registration does not declare .*"
                                          r"needs=\('seed', 'pool',\)"):
        sources.resolve("donor_query", s, seed=0, pool=["other"])


@pytest.mark.parametrize("kwargs, message", [
    ({"needs": ("generated",)}, "takes no argument"),
    ({"arg": "<t>", "needs": ("generated",), "document": "theirs"}, "document='theirs' is not known"),
    ({"needs": ("donor",), "document": "donor"}, "it does not need 'generated'"),
    ({"arg": "<t>", "needs": ("generated",), "document": "donor", "per_document": True}, "per_document=True"),
    ({"needs": ("weights",)}, "'weights' is not something a source can be given"),
])
def test_a_declaration_that_cannot_work_is_refused_when_registered(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sources.register_source("generated_reversed", **kwargs)
