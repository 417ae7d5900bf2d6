"""Multi-document samples (kvprime.data.distractors): k passages, the gold in its recorded slot, distractors from
the configured source, each draw seeded per sample."""


import numpy as np
import pytest
from fixtures.jsonl import write_jsonl

from kvprime.config import settings
from kvprime.data import load_samples
from kvprime.data.distractors import Pool, attach, eligible
from kvprime.data.types import Sample
from kvprime.errors import ConfigError

# 4 articles: a1 and a2 have 4 paragraphs, a3 has 2, a4 has 1; two questions on every paragraph.
ARTICLES = {"a1": 4, "a2": 4, "a3": 2, "a4": 1}


def rows():
    out = []
    for art, n in ARTICLES.items():
        for p in range(n):
            for q in range(2):
                out.append({"id": f"{art}-p{p}-q{q}", "article": art,
                            "passage": f"Paragraph {p} of article {art} tells about topic {art}{p} in some words.",
                            "query": f"What about {art}{p} (question {q})?", "answer": f"topic {art}{p}"})
    return out


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows())
    return {"name": "jsonl", "path": str(path), "n_samples": None, "selection": "first", "seed": 0}


def md(**kw):
    return {**settings.defaults()["multidoc"], "seed": 42, **kw}


def test_k1_leaves_samples_and_their_records_as_they_were(data):
    plain = load_samples(data)
    same = load_samples(data, multidoc=md(k=1))
    assert plain.samples == same.samples and not any(s.passages for s in same.samples)
    assert "article" not in same.samples[0].to_dict() and "gold_slot" not in same.samples[0].to_dict()


@pytest.mark.parametrize("slot, index", [("first", 0), ("middle", 1), ("last", 2)])
def test_random_distractors_put_the_gold_in_its_slot(data, slot, index):
    res = load_samples(data, multidoc=md(k=3, gold_slot=slot))
    every = {r["passage"] for r in rows()}
    assert len(res.samples) == len(rows()) and not res.rejected
    for s in res.samples:
        assert len(s.passages) == 3 and len(set(s.passages)) == 3
        assert s.gold_slot == index and s.passages[index] == s.passage
        assert set(s.passages) <= every
        record = s.to_dict()
        assert record["gold_slot"] == index and record["passages"] == list(s.passages)


def test_random_slot_is_seeded_per_sample_and_recorded(data):
    a = load_samples(data, multidoc=md(k=5, gold_slot="random")).samples
    b = load_samples({**data, "n_samples": 3}, multidoc=md(k=5, gold_slot="random")).samples
    assert [s.passages for s in a[:3]] == [s.passages for s in b]  # a sample's context ignores the selection
    assert len({s.gold_slot for s in a}) >= 3  # slots really vary over 22 samples
    assert all(s.passages[s.gold_slot] == s.passage for s in a)
    c = load_samples({**data, "seed": 7}, multidoc=md(k=5, gold_slot="random")).samples
    assert [s.passages for s in a] != [s.passages for s in c]


def test_middle_of_five_is_the_third():
    pool = Pool([Sample(f"s{i}", f"passage {i}", "q", "a") for i in range(6)])
    (s,) = attach([Sample("s0", "passage 0", "q", "a")], pool, md(k=5, gold_slot="middle"))
    assert s.gold_slot == 2 and s.passages[2] == "passage 0"


def test_same_article_draws_topical_distractors_and_rejects_short_articles(data):
    res = load_samples({**data, "n_samples": 10}, multidoc=md(k=3, distractors="same_article", gold_slot="first"))
    by_text = {r["passage"]: r["article"] for r in rows()}
    assert len(res.samples) == 10  # n_samples is honoured: eligibility is decided before selection
    for s in res.samples:
        assert [by_text[p] for p in s.passages] == [s.article] * 3
    reasons = {r["source_id"]: r["reason"] for r in res.rejected}
    # a3 has 2 paragraphs and a4 one: their 6 questions cannot have 2 distractors from their article
    assert set(reasons) == {f"{a}-p{p}-q{q}" for a in ("a3", "a4") for p in range(ARTICLES[a]) for q in range(2)}
    assert "needs 2 distractors from same_article; article 'a4' offer 0" in reasons["a4-p0-q0"]


def test_same_article_needs_articles():
    bare = [Sample(f"s{i}", f"passage {i}", "q", "a") for i in range(4)]
    with pytest.raises(ConfigError, match="same_article needs a source that groups passages"):
        eligible(bare, md(k=2, distractors="same_article"))


def test_candidates_are_the_querys_own_passages():
    cands = [Sample("m1", "gold one", "q1", "a", candidates=("c1", "c2", "c3", "gold one")),
             Sample("m2", "gold two", "q2", "a", candidates=("d1",))]
    kept, rejected, pool = eligible(cands, md(k=3, distractors="candidates"))
    assert [s.sample_id for s in kept] == ["m1"] and rejected[0]["source_id"] == "m2"
    (s,) = attach(kept, pool, md(k=3, distractors="candidates", gold_slot="last"))
    assert s.passages[2] == "gold one" and set(s.passages[:2]) <= {"c1", "c2", "c3"}


def test_nearest_ranks_by_similarity_and_skips_the_gold(monkeypatch):
    from kvprime.models.embedder import Embedder

    vectors = {"q": [1.0, 0.0], "gold": [0.9, 0.1], "near": [0.8, 0.2], "mid": [0.5, 0.5], "far": [0.0, 1.0]}
    monkeypatch.setattr(Embedder, "embed",
                        lambda self, texts: np.array([vectors[t] / np.linalg.norm(vectors[t]) for t in texts]))
    samples = [Sample("s", "gold", "q", "a")] + [Sample(t, t, "x", "a") for t in ("near", "mid", "far")]
    kept, _, pool = eligible(samples, md(k=3, distractors="nearest", gold_slot="first"))
    (s,) = attach(kept[:1], pool, md(k=3, distractors="nearest", gold_slot="first"))
    assert s.passages == ("gold", "near", "mid")


def test_too_few_passages_and_given_passages_are_refused():
    two = [Sample("a", "p1", "q", "x"), Sample("b", "p2", "q", "x")]
    with pytest.raises(ConfigError, match="multidoc.k=3 with multidoc.distractors=random needs at least 3"):
        eligible(two, md(k=3))
    with pytest.raises(ConfigError, match="already gives sample 'c' several passages"):
        eligible([Sample("c", "p", "q", "x", passages=("p", "o"))], md(k=2))


@pytest.mark.slow
def test_squad_same_article_and_real_minilm_nearest():
    # Passages of 140-150 words: a pool of 119 that MiniLM embeds in seconds (all SQuAD's take a minute and a half);
    # same_article still finds 3 per sample.
    cfg = {"name": "squad_v11", "path": None, "n_samples": 3, "selection": "first", "seed": 0,
           "filters": {"min_passage_words": 140, "max_passage_words": 150}}
    res = load_samples(cfg, multidoc=md(k=3, distractors="same_article"))
    assert all(len(set(s.passages)) == 3 and s.article for s in res.samples)
    near = load_samples(cfg, multidoc=md(k=3, distractors="nearest", gold_slot="first")).samples
    assert all(s.passages[0] == s.passage and s.passage not in s.passages[1:] for s in near)


def test_msmarco_records_keep_the_querys_other_candidates():
    from kvprime.data.msmarco import _record

    item = {"query_id": 7, "query": "what is x", "answers": ["x is y"], "wellFormedAnswers": [],
            "passages": {"passage_text": ["first", "selected one", "third"], "is_selected": [0, 1, 0]}}
    walk = _record(item, "walkthrough")
    assert walk.passage == "selected one" and walk.candidates == ("first", "third")
    first = _record(item, "exp21")
    assert first.passage == "first" and first.candidates == ("selected one", "third")
    (s,) = attach([walk], Pool([walk]), md(k=3, distractors="candidates", gold_slot="middle"))
    assert s.passages[1] == "selected one" and set(s.passages) == {"first", "selected one", "third"}
