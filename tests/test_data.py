"""Tests for kvprime.data: loaders, checks, selection. Fixtures are written into tmp_path."""

from __future__ import annotations

import json

import pytest
from fixtures.jsonl import write_jsonl

from kvprime.data import LOADERS, load_samples
from kvprime.data.types import Sample

# --------------------------------------------------------------------------- fixtures

LONG = " ".join(f"w{i}" for i in range(30))  # a 30-word passage


def _words(n: int, stem: str = "x") -> str:
    return " ".join(f"{stem}{i}" for i in range(n))


@pytest.fixture
def squad_file(tmp_path):
    doc = {
        "version": "1.1",
        "data": [
            {
                "title": "France",
                "paragraphs": [
                    {
                        "context": "Paris is the capital of France. " + LONG,
                        "qas": [
                            {"id": "q1", "question": "What is the capital of France?",
                             "answers": [{"text": "Paris", "answer_start": 0},
                                         {"text": "Paris", "answer_start": 0},
                                         {"text": "the city of Paris", "answer_start": 0}]},
                            {"id": "q2", "question": "Which country?",
                             "answers": [{"text": "", "answer_start": 0}]},
                        ],
                    }
                ],
            },
            {
                "title": "Short",
                "paragraphs": [
                    {"context": "Tiny context here.",
                     "qas": [{"id": "q3", "question": "How long?",
                              "answers": [{"text": "three words long", "answer_start": 0}]}]},
                    {"context": "Another " + LONG,
                     "qas": [{"id": "q4", "question": "What is it?",
                              "answers": [{"text": "another one", "answer_start": 0}]}]},
                ],
            },
        ],
    }
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(doc))
    return path


def _marco(qid, query, passages, selected, answers, well_formed=()):
    return {
        "query": query,
        "query_id": qid,
        "query_type": "DESCRIPTION",
        "answers": list(answers),
        "wellFormedAnswers": list(well_formed),
        "passages": {"is_selected": list(selected), "passage_text": list(passages),
                     "url": [f"http://example.com/{qid}/{i}" for i in range(len(passages))]},
    }


@pytest.fixture
def marco_file(tmp_path):
    p25, p10, p200 = _words(25, "a"), _words(10, "b"), _words(200, "c")
    records = [
        # 101: first passage is fine, the selected one is the second; well-formed answer present.
        _marco(101, "what is a", [p25, _words(40, "sel")], [0, 1], ["a is a letter"],
               ["A is the first letter."]),
        # 102: answer is "No Answer Present."; first passage fine for exp21.
        _marco(102, "what is b", [p25, p25], [0, 0], ["No Answer Present."]),
        # 103: nothing selected (walkthrough rejects); exp21's first passage is too short.
        _marco(103, "what is c", [p10, p25], [0, 0], ["c is c"]),
        # 104: first passage too long for exp21; selected passage fine.
        _marco(104, "what is d", [p200, p25], [0, 1], ["d is the fourth"]),
        # 105: a one-word answer (exp21's min_answer_words=2 rejects it).
        _marco(105, "what is e", [p25], [1], ["e"]),
        # 106: empty answers list.
        _marco(106, "what is f", [p25], [1], []),
        # 107: literal "[]" well-formed answer means none (notebook 004).
        _marco(107, "what is g", [p25], [1], ["g is seventh"], ["[]"]),
    ]
    path = tmp_path / "msmarco.jsonl"
    write_jsonl(path, records)
    return path


EXP21_FILTERS = {"min_passage_words": 20, "max_passage_words": 150,
                 "min_answer_words": 2, "max_answer_words": 30}


def _marco_cfg(path, tmp_path, mode, **kw):
    return {"name": "msmarco_v11", "path": str(path), "mode": mode,
            "cache_dir": str(tmp_path / "hf_cache"), **kw}


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _reasons(result):
    return {r["source_id"]: r["reason"] for r in result.rejected}


# --------------------------------------------------------------------------- SQuAD


def test_squad_ids_answers_and_empty_rejection(squad_file):
    res = load_samples({"name": "squad_v11", "path": str(squad_file)})
    assert [s.sample_id for s in res.samples] == ["q1", "q3", "q4"]
    q1 = res.samples[0]
    assert q1.answer == "Paris"
    assert q1.answers == ("Paris", "the city of Paris")
    assert q1.passage.startswith("Paris is the capital")
    assert q1.source == "squad_v11"
    assert res.rejected == [{"source_id": "q2", "reason": "empty answer"}]
    assert res.n_candidates == 3


def test_squad_word_filters(squad_file):
    res = load_samples({"name": "squad_v11", "path": str(squad_file),
                        "filters": {"min_passage_words": 20, "max_answer_words": 2}})
    assert [s.sample_id for s in res.samples] == ["q1", "q4"]
    reasons = _reasons(res)
    assert reasons["q3"] == "passage has 3 words (< min_passage_words=20)"
    assert reasons["q2"] == "empty answer"
    # q1's scored answer is one word; its longer alternative does not matter.
    res = load_samples({"name": "squad_v11", "path": str(squad_file),
                        "filters": {"max_answer_words": 1}})
    assert _reasons(res)["q4"] == "answer has 2 words (> max_answer_words=1)"


def test_squad_null_path_uses_packaged_asset(squad_file, monkeypatch):
    # A stand-in for kvprime.assets, so the test needs no packaged file and no network.
    import types

    from kvprime.data import squad

    calls = []
    fake = types.ModuleType("kvprime.assets")
    fake.fetch = lambda name: calls.append(name) or squad_file
    monkeypatch.setattr(squad, "assets", fake)
    res = load_samples({"name": "squad_v11", "path": None, "n_samples": 1})
    assert calls == ["squad_v11"]
    assert [s.sample_id for s in res.samples] == ["q1"]


def test_squad_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_samples({"name": "squad_v11", "path": str(missing)})


# --------------------------------------------------------------------------- MS MARCO


def test_msmarco_exp21_first_passage_and_answer(marco_file, tmp_path):
    res = load_samples(_marco_cfg(marco_file, tmp_path, "exp21"))
    by_id = {s.sample_id: s for s in res.samples}
    assert by_id["101"].passage == _words(25, "a")  # first passage, not the selected one
    assert by_id["101"].answer == "a is a letter"  # answers[0], well-formed ignored
    assert by_id["102"].answer == "No Answer Present."  # exp21 did not filter it
    assert by_id["101"].source == "msmarco_v11"
    assert _reasons(res) == {"106": "empty answer"}


def test_msmarco_exp21_filters(marco_file, tmp_path):
    res = load_samples(_marco_cfg(marco_file, tmp_path, "exp21", filters=EXP21_FILTERS))
    assert [s.sample_id for s in res.samples] == ["101", "102", "107"]
    assert _reasons(res) == {
        "103": "passage has 10 words (< min_passage_words=20)",
        "104": "passage has 200 words (> max_passage_words=150)",
        "105": "answer has 1 words (< min_answer_words=2)",
        "106": "empty answer",
    }
    assert res.n_candidates == 3


def test_msmarco_walkthrough(marco_file, tmp_path):
    res = load_samples(_marco_cfg(marco_file, tmp_path, "walkthrough"))
    by_id = {s.sample_id: s for s in res.samples}
    assert list(by_id) == ["101", "104", "105", "107"]
    assert by_id["101"].answer == "A is the first letter."  # well-formed preferred
    assert by_id["101"].answers == ("A is the first letter.", "a is a letter")
    assert by_id["101"].passage == _words(40, "sel")  # the selected passage
    assert by_id["104"].passage == _words(25, "a")
    assert by_id["107"].answer == "g is seventh"  # "[]" is not a well-formed answer
    reasons = _reasons(res)
    assert "No Answer Present." in reasons["102"]
    assert reasons["103"] == "no passage with is_selected == 1"
    assert reasons["106"] == "empty answer"


def test_msmarco_hub_unreachable_mentions_dataset_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'microsoft/ms_marco' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"dataset\.path") as info:
        load_samples({"name": "msmarco_v11", "path": None, "split": "validation"})
    assert "hub" in str(info.value).lower()
    assert isinstance(info.value.__cause__, ConnectionError)


def test_msmarco_bad_mode(marco_file, tmp_path):
    with pytest.raises(ValueError, match="exp21.*walkthrough"):
        load_samples(_marco_cfg(marco_file, tmp_path, "nonsense"))


# --------------------------------------------------------------------------- JSONL


def test_jsonl_ids_with_and_without_id(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"id": "alpha", "passage": "p one", "query": "q one", "answer": "a one",
         "answers": ["a one", "other"]},
        {"passage": "p two", "query": "q two", "answer": "a two"},
        "",
        {"id": 7, "passage": "p three", "query": "q three", "answer": "a three"},
    ])
    res = load_samples({"name": "jsonl", "path": str(path)})
    assert [s.sample_id for s in res.samples] == ["alpha", "mine:2", "7"]
    assert res.samples[0].answers == ("a one", "other")
    assert res.samples[1].answers == ("a two",)


def test_jsonl_malformed_line_names_line_number(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"passage": "p", "query": "q", "answer": "a"},
        "{not json",
    ])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2"):
        load_samples({"name": "jsonl", "path": str(path)})


def test_jsonl_missing_field_names_field_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"passage": "p", "query": "q", "answer": "a"},
        {"passage": "p", "query": "q", "answer": "a"},
        {"passage": "p", "answer": "a"},
    ])
    with pytest.raises(ValueError, match=r"line 3.*'query'"):
        load_samples({"name": "jsonl", "path": str(path)})


def test_jsonl_path_required_and_must_exist(tmp_path):
    with pytest.raises(ValueError, match="dataset.path"):
        load_samples({"name": "jsonl"})
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_samples({"name": "jsonl", "path": str(tmp_path / "absent.jsonl")})


# --------------------------------------------------------------------------- sanity example


def test_sanity_example():
    res = load_samples({"name": "exp21_sanity"})
    (s,) = res.samples
    assert s.sample_id == "exp21-sanity-france"
    assert s.answer == "Paris"
    assert s.random_query == "What is the population of Japan?"
    assert "Eiffel Tower" in s.passage


# --------------------------------------------------------------------------- selection


@pytest.fixture
def twenty(tmp_path):
    return _write_jsonl(tmp_path / "twenty.jsonl", [
        {"id": f"s{i:02d}", "passage": f"passage {i}", "query": f"query {i}", "answer": f"ans {i}"}
        for i in range(20)
    ])


def _ids(path, **kw):
    return [s.sample_id for s in load_samples({"name": "jsonl", "path": str(path), **kw}).samples]


def test_random_selection_deterministic_and_in_source_order(twenty):
    a = _ids(twenty, n_samples=5, selection="random", seed=1)
    assert a == _ids(twenty, n_samples=5, selection="random", seed=1)
    assert a == sorted(a) and len(set(a)) == 5
    assert set(a) != set(_ids(twenty, n_samples=5, selection="random", seed=2))


def test_selection_first_and_oversized(twenty):
    assert _ids(twenty, n_samples=3, selection="first") == ["s00", "s01", "s02"]
    every = [f"s{i:02d}" for i in range(20)]
    assert _ids(twenty, n_samples=50, selection="random", seed=0) == every
    assert _ids(twenty, n_samples=None) == every
    res = load_samples({"name": "jsonl", "path": str(twenty), "n_samples": 3})
    assert res.n_candidates == 20


def test_selection_after_checks(twenty):
    # Candidates are counted after the filters, and only candidates are selected.
    res = load_samples({"name": "jsonl", "path": str(twenty), "n_samples": 2,
                        "filters": {"min_passage_words": 3}})
    assert res.samples == [] and res.n_candidates == 0 and len(res.rejected) == 20


def test_bad_common_options(twenty):
    with pytest.raises(ValueError, match="selection"):
        load_samples({"name": "jsonl", "path": str(twenty), "selection": "best"})
    with pytest.raises(ValueError, match="seed"):
        load_samples({"name": "jsonl", "path": str(twenty), "n_samples": 2, "selection": "random"})
    with pytest.raises(ValueError, match="min_pasage_words"):
        load_samples({"name": "jsonl", "path": str(twenty), "filters": {"min_pasage_words": 3}})


# --------------------------------------------------------------------------- registry, ids, records


def test_unknown_loader_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_samples({"name": "ms_marco"})
    for name in ("squad_v11", "msmarco_v11", "jsonl", "exp21_sanity"):
        assert name in str(info.value)
    assert set(LOADERS) >= {"squad_v11", "msmarco_v11", "jsonl", "exp21_sanity"}


def test_duplicate_ids_raise(tmp_path):
    path = _write_jsonl(tmp_path / "dup.jsonl", [
        {"id": "same", "passage": "p", "query": "q", "answer": "a"},
        {"id": "same", "passage": "p2", "query": "q2", "answer": "a2"},
    ])
    with pytest.raises(ValueError, match="'same'"):
        load_samples({"name": "jsonl", "path": str(path)})


def test_sample_round_trip():
    s = Sample("id1", "a passage", "a query", "ans", ("ans", "alt"), "src", "rq")
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Sample.from_dict(d) == s
    assert Sample.from_dict(json.loads(json.dumps(d))) == s
    bare = Sample("id2", "p", "q", "a")
    assert Sample.from_dict(bare.to_dict()) == bare
