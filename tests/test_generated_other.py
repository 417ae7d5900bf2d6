"""generated_other:<template>: another document's generated surrogate, by a seeded derangement of the selection."""

from types import SimpleNamespace

import pytest
from fixtures.jsonl import write_jsonl

from kvprime.errors import ConfigError
from kvprime.pipeline.session import Session
from kvprime.surrogates import sources
from kvprime.surrogates.sources import derangement, validate_source


def _samples(docs):
    return [SimpleNamespace(sample_id=f"s{i:02d}", passage=d) for i, d in enumerate(docs)]


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_derangement_has_no_fixed_points_and_is_a_permutation(n):
    samples = _samples([f"document {i}" for i in range(n)])
    for seed in range(5):
        d = derangement(samples, seed)
        assert sorted(d) == sorted(d.values()) == sorted(s.sample_id for s in samples)
        assert all(k != v for k, v in d.items())


def test_derangement_is_deterministic_and_depends_only_on_seed_ids_and_documents():
    samples = _samples([f"document {i}" for i in range(20)])
    d = derangement(samples, 42)
    assert derangement(list(reversed(samples)), 42) == d  # the data file's order does not matter
    assert derangement(samples, 43) != d
    assert derangement(_samples([f"document {i}" for i in range(20)]), 42) == d


def test_identical_documents_are_avoided_where_possible():
    docs = ["A", "A", "A", "B", "B", "C", "D", "E"]  # the largest group (3) is at most half of 8
    samples = _samples(docs)
    by_id = {s.sample_id: s.passage for s in samples}
    for seed in range(20):
        d = derangement(samples, seed)
        assert all(by_id[k] != by_id[v] for k, v in d.items())
    # 4 copies of one document among 5 samples: 2*4-5 = 3 of them must get a copy (the fewest possible).
    samples = _samples(["A", "A", "A", "A", "B"])
    by_id = {s.sample_id: s.passage for s in samples}
    d = derangement(samples, 0)
    assert all(k != v for k, v in d.items())
    assert sum(by_id[k] == by_id[v] for k, v in d.items()) == 3
    d = derangement(_samples(["A", "A", "A"]), 0)  # all identical: still no sample is its own donor
    assert all(k != v for k, v in d.items())


def test_too_few_samples_and_unknown_templates_are_refused():
    with pytest.raises(ConfigError, match="at least 2 samples"):
        derangement(_samples(["only"]), 0)
    with pytest.raises(ConfigError, match="unknown generation template 'nope'.*target_question"):
        validate_source("generated_other:nope", sources.STATIC_SURROGATES)
    validate_source("generated_other:exp01", sources.STATIC_SURROGATES)
    assert "generated_other:<template>" in sources.SOURCES
    assert sources.generated_template("generated_other:exp01") == "exp01"
    assert sources.generated_template("static:factual") is None


N = 6


@pytest.fixture()
def overrides(tmp_path):
    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city of France and into the "
                                       f"sea near the tower {i}. Boats carry grain along it.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(N)]
    rows[5]["passage"] = rows[4]["passage"]  # two samples with one document: neither gets the other's surrogate
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, rows)
    return ["experiment=exp21", "+condition/routing@conditions.gen_keyword_query=gen_keyword_query",
            "+condition/routing@conditions.gen_other_keyword_query=gen_other_keyword_query",
            "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={path}", f"dataset.n_samples={N}",
            "progress=false", "generation.max_new_tokens=6", "batch.samples=1",
            f"generation.store={tmp_path / 'store'}"]


def test_resolved_text_is_another_samples_generated_text_in_every_shard(overrides):
    whole = Session.from_overrides(overrides)
    resolved = whole.resolved()
    assert len(resolved) == N
    by_id = {s.sample_id: s for s in whole.samples}
    service = whole.surrogate_service
    for sid, texts in resolved.items():
        donor = service.donors[sid]
        assert donor != sid and by_id[donor].passage != by_id[sid].passage
        assert texts["gen_other_keyword_query"] == resolved[donor]["gen_keyword_query"]
        # The control costs what the sample's own generated surrogate costs: what an index would pay for.
        own_cost = service.generation_cost(whole.specs["gen_keyword_query"], by_id[sid])
        assert service.generation_cost(whole.specs["gen_other_keyword_query"], by_id[sid]) == own_cost
        assert own_cost["prompt_tokens"] > 0
    # Sharded: each shard sees a third of the samples, yet every sample gets the donor and text it gets whole.
    for shard in range(3):
        part = Session.from_overrides([*overrides, "run.num_shards=3", f"run.shard={shard}"])
        assert len(part.samples) == 2 and part.surrogate_service.donors == service.donors
        part.generate()  # generates (or reads) the donors' surrogates too
        for s in part.samples:
            assert part.surrogates(s)["gen_other_keyword_query"] == resolved[s.sample_id]["gen_other_keyword_query"]


def test_one_sample_with_generated_other_is_refused_before_loading(overrides):
    with pytest.raises(ConfigError, match="at least 2 samples"):
        Session.from_overrides([*overrides, "dataset.n_samples=1"])


def test_outside_sample_gets_a_selected_donor_and_leaves_the_selections_alone(overrides):
    session = Session.from_overrides([*overrides, "dataset.n_samples=3"])
    service = session.surrogate_service
    before = dict(service.donors)
    outsider = session.sample("s4")
    donor = service.donor(outsider)
    assert donor.sample_id in before and donor.passage != outsider.passage
    text = session.surrogates(outsider)["gen_other_keyword_query"]
    assert text == service.generated[("keyword_query", donor.passage)]
    assert service.donors == before
    assert sorted(before.values()) == sorted(before)  # still a permutation of the selection
