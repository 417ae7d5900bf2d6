"""The seeded synthetic retrieval tasks (kvprime.data.synthetic, issue 23 items 1 and 2): what each sample holds and
records, every knob, the refusals, determinism across machines, and the Sample fields they add."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from kvprime.data import load_samples
from kvprime.data.synthetic import draws
from kvprime.data.synthetic.text import COLOURS, OBJECTS, WORDS, filler_sentence
from kvprime.data.types import Sample
from kvprime.errors import ConfigError

FACT = re.compile(r"The access code for the (\w+ \w+) is (\w+)\.")
POINTER = re.compile(r"The (\w+ \w+) uses the same access code as the (\w+ \w+)\.")


# The knobs these tests were written for (the first defaults), pinned so that calibrating the defaults
# (conf/dataset/synthetic_*.yaml, kvprime.data.synthetic.tasks.DEFAULTS) changes no sample a test asserts on.
PINNED = {
    "synthetic_kv": {"documents": 3, "words_per_document": 60, "facts_per_document": 2},
    "synthetic_twohop": {"documents": 3, "words_per_document": 60, "facts_per_document": 2, "hop_order": "random"},
    "synthetic_niah": {"words_per_document": 400, "facts_per_document": 1},
}


def _load(name, n=12, **knobs):
    return load_samples({"name": name, "n_samples": n, "seed": 42, **PINNED[name], **knobs}).samples


def _facts(text):
    return FACT.findall(text)


def _dump(samples):
    return "".join(json.dumps(s.to_dict(), sort_keys=True) + "\n" for s in samples)


# ------------------------------------------------------------ determinism


# The first four samples of each task at the pinned knobs and seed 42, hashed: the same bytes on every machine and
# Python version (the draws use only random.Random(str).random(), whose sequence Python guarantees).
GOLDEN = {
    "synthetic_kv": "e29acb1bada9eb4d",
    "synthetic_twohop": "0ebc90e3b865016d",
    "synthetic_niah": "c428f5369358a316",
}


@pytest.mark.parametrize("task", sorted(GOLDEN))
def test_the_same_seed_and_knobs_give_byte_identical_samples_and_ids(task):
    first, again = _dump(_load(task, 4)), _dump(_load(task, 4))
    assert first == again
    assert hashlib.sha256(first.encode()).hexdigest()[:16] == GOLDEN[task]


@pytest.mark.integration
def test_another_process_with_another_hash_seed_gives_the_same_bytes():
    code = ("import json; from kvprime.data import load_samples\n"
            "s = load_samples({'name': 'synthetic_twohop', 'n_samples': 3, 'seed': 7, 'lures': 1, "
            "'documents': 3, 'facts_per_document': 2, 'hop_order': 'random'}).samples\n"
            "print(''.join(json.dumps(x.to_dict(), sort_keys=True) + '\\n' for x in s), end='')")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert out[0] == out[1] == _dump(load_samples({"name": "synthetic_twohop", "n_samples": 3, "seed": 7,
                                                   "documents": 3, "facts_per_document": 2, "hop_order": "random",
                                                   "lures": 1}).samples)


def test_more_samples_extend_the_list_and_another_seed_changes_it():
    few, many = _load("synthetic_kv", 3), _load("synthetic_kv", 10)
    assert many[:3] == few
    other = load_samples({"name": "synthetic_kv", "n_samples": 3, "seed": 43, **PINNED["synthetic_kv"]}).samples
    assert {s.sample_id for s in other}.isdisjoint(s.sample_id for s in few)
    assert [s.passages for s in other] != [s.passages for s in few]


def test_n_generates_a_pool_that_n_samples_selects_from():
    pool = load_samples({"name": "synthetic_kv", "n": 20, "n_samples": 5, "selection": "random", "seed": 42,
                         **PINNED["synthetic_kv"]})
    assert pool.n_candidates == 20 and len(pool.samples) == 5
    assert set(pool.samples) <= set(_load("synthetic_kv", 20))


def test_a_depth_sweep_changes_only_the_gold_facts_place():
    shallow, deep = _load("synthetic_kv", 4, depth=0.0), _load("synthetic_kv", 4, depth=1.0)
    for a, b in zip(shallow, deep, strict=True):
        assert a.answer == b.answer and a.info["key"] == b.info["key"] and a.gold_slot == b.gold_slot
        others = lambda s: [f for f in s.info["facts"] if f["role"] != "gold"]  # noqa: E731
        assert [(f["slot"], f["key"]) for f in others(a)] == [(f["slot"], f["key"]) for f in others(b)]


# ------------------------------------------------------------ key-value retrieval


def test_kv_asks_one_fact_and_records_its_document_and_every_fact_position():
    for s in _load("synthetic_kv", 20, lures=1):
        assert len(s.passages) == 3 and s.gold_slots == (s.gold_slot,) and s.passage == s.passages[s.gold_slot]
        facts = [f for doc in s.passages for f in _facts(doc)]
        assert len(facts) == 6 and len({k for k, _ in facts}) == 6 and len({v for _, v in facts}) == 6
        key = s.info["key"]
        assert (key, s.answer) in _facts(s.passages[s.gold_slot]) and key in s.query
        assert s.query.endswith("Answer with the number only.") and re.fullmatch(r"[1-9]\d{3}", s.answer)
        assert s.answers == (s.answer,) and s.source == "synthetic_kv"
        assert sum(k.split()[1] == key.split()[1] for k, _ in facts) == 2  # the asked key and its lure
        for f in s.info["facts"]:
            doc = s.passages[f["slot"]]
            sentence = f"The access code for the {f['key']} is {f['value']}."
            assert doc[f["char"]:].startswith(sentence)
            assert len(doc[:f["char"]].split()) == f["word"] and 0 <= f["depth"] <= 1
        assert [f["role"] for f in s.info["facts"]].count("gold") == 1
        assert {f["role"] for f in s.info["facts"]} == {"gold", "lure", "distractor"}


def test_kv_knobs_documents_facts_words_and_value_format():
    for s in _load("synthetic_kv", 6, documents=5, facts_per_document=3, words_per_document=120,
                   value_format="words"):
        assert len(s.passages) == 5 and all(len(_facts(d)) == 3 for d in s.passages)
        assert all(120 <= len(d.split()) < 120 + 20 for d in s.passages)
        assert s.answer in WORDS and s.query.endswith("Answer with the code word only.")
    assert all(len(s.answer) == 6 for s in _load("synthetic_kv", 4, digits=6))
    assert all(s.query.endswith("?") for s in _load("synthetic_kv", 2, instruction=""))
    assert all(s.query.endswith("? Reply briefly.") for s in _load("synthetic_kv", 2, instruction="Reply briefly."))


@pytest.mark.parametrize("policy, slots", [("first", [0] * 6), ("last", [2] * 6), ("middle", [1] * 6),
                                           ("cycle", [0, 1, 2, 0, 1, 2]), (2, [2] * 6)])
def test_gold_slot_policies(policy, slots):
    assert [s.gold_slot for s in _load("synthetic_kv", 6, gold_slot=policy)] == slots


def test_random_gold_slots_vary_and_depth_lists_cycle():
    assert len({s.gold_slot for s in _load("synthetic_kv", 30)}) == 3
    samples = _load("synthetic_kv", 6, depth=[0, 1], words_per_document=100)
    gold = [next(f for f in s.info["facts"] if f["role"] == "gold") for s in samples]
    assert [g["word"] == 0 for g in gold] == [True, False] * 3
    for s, g in zip(samples, gold, strict=True):
        if g["word"]:  # depth 1: after the last filler sentence (other facts may follow it)
            rest = s.passages[g["slot"]][g["char"]:]
            assert all(FACT.fullmatch(x + ".") for x in rest.rstrip(".").split(". ")), rest


# ------------------------------------------------------------ two hops


@pytest.mark.parametrize("order", ["forward", "backward", "random"])
def test_twohop_records_both_gold_documents_in_hop_order(order):
    samples = _load("synthetic_twohop", 20, hop_order=order)
    for s in samples:
        first, second = s.gold_slots
        assert first != second and s.gold_slot == first and s.passage == s.passages[first]
        (key, target), = POINTER.findall(s.passages[first])
        assert key == s.info["key"] and key in s.query and target == s.info["bridge"]
        assert (target, s.answer) in _facts(s.passages[second])
        # the asked key's code is stated nowhere: only the pointer leads to it
        assert all(k != key for doc in s.passages for k, _ in _facts(doc))
        assert s.info["hops"] == [first, second] and s.info["answer_slot"] == second
        assert s.info["hop_order"] == ("forward" if first < second else "backward")
        roles = {f["role"]: f["slot"] for f in s.info["facts"]}
        assert roles["hop1"] == first and roles["hop2"] == second
    orders = {s.info["hop_order"] for s in samples}
    assert orders == ({"forward", "backward"} if order == "random" else {order})


def test_twohop_defaults_to_the_pointer_before_the_code():
    """The calibrated default (README): forward hop order; the loader's default, not only the YAML's."""
    samples = load_samples({"name": "synthetic_twohop", "n_samples": 6, "seed": 42}).samples
    assert {s.info["hop_order"] for s in samples} == {"forward"} and all(a < b for a, b in (s.gold_slots
                                                                                           for s in samples))


def test_twohop_needs_two_documents():
    with pytest.raises(ConfigError, match=r"dataset.documents=1 .*synthetic_twohop needs 2 or more"):
        _load("synthetic_twohop", documents=1)


# ------------------------------------------------------------ needle in a haystack


def test_niah_is_one_long_document_with_the_needle_at_its_depth():
    for depth in (0.0, 0.5, 1.0):
        for s in _load("synthetic_niah", 3, depth=depth, words_per_document=300):
            assert s.passages == () and s.gold_slot is None and s.gold_slots == ()
            assert 300 <= len(s.passage.split()) < 320
            (needle,) = s.info["facts"]
            assert needle["role"] == "needle" and needle["slot"] == 0 and (s.info["key"], s.answer) in _facts(s.passage)
            assert abs(needle["depth"] - depth) < 0.05
    d = _load("synthetic_niah", 2, facts_per_document=4, lures=2)[0]
    assert len(_facts(d.passage)) == 4 and [f["role"] for f in d.info["facts"]].count("lure") == 2
    assert "task_info" in d.to_dict() and "gold_slots" not in d.to_dict() and "passages" not in d.to_dict()


# ------------------------------------------------------------ the filler


def test_filler_never_names_a_key_or_a_value():
    stream = draws.stream("filler-test")
    vocabulary = {w.strip(".,").lower() for _ in range(2000) for w in filler_sentence(stream).split()}
    assert vocabulary.isdisjoint(COLOURS) and vocabulary.isdisjoint(OBJECTS) and vocabulary.isdisjoint(WORDS)
    assert not any(ch.isdigit() for w in vocabulary for ch in w)
    assert {"code", "access"}.isdisjoint(vocabulary)


# ------------------------------------------------------------ refusals


@pytest.mark.parametrize("task, knobs, match", [
    ("synthetic_kv", {"depth": 1.5}, r"dataset.depth=1.5 is not accepted"),
    ("synthetic_kv", {"depth": []}, r"dataset.depth=\[\] is not accepted"),
    ("synthetic_kv", {"gold_slot": 3}, r"dataset.gold_slot=3 is not accepted: .*from 0 to 2"),
    ("synthetic_kv", {"gold_slot": "centre"}, r"dataset.gold_slot='centre'"),
    ("synthetic_kv", {"value_format": "hex"}, r"dataset.value_format='hex' is not accepted. Accepted: digits, words"),
    ("synthetic_kv", {"lures": 6}, r"dataset.lures=6 is not accepted: .*at most 5"),
    ("synthetic_kv", {"documents": 0}, r"dataset.documents=0 is not accepted"),
    ("synthetic_kv", {"words_per_document": -1}, r"dataset.words_per_document=-1"),
    ("synthetic_kv", {"facts_per_document": True}, r"dataset.facts_per_document=True"),
    ("synthetic_kv", {"value_format": "words", "documents": 10, "facts_per_document": 5}, r"40 distinct code words"),
    ("synthetic_kv", {"documents": 64, "facts_per_document": 10}, r"640 facts"),
    ("synthetic_kv", {"instruction": 3}, r"dataset.instruction=3"),
    ("synthetic_twohop", {"hop_order": "sideways"}, r"dataset.hop_order='sideways'"),
    ("synthetic_kv", {"group_by_passage": True}, r"dataset.group_by_passage=true .* no two samples share"),
])
def test_bad_knobs_are_refused_in_one_paragraph(task, knobs, match):
    with pytest.raises(ConfigError, match=match):
        _load(task, 3, **knobs)


def test_unknown_or_undeclared_knobs_are_refused():
    with pytest.raises(ConfigError, match="dataset.colour"):
        _load("synthetic_kv", colour="red")
    with pytest.raises(ConfigError, match="dataset.documents"):  # the needle task has one document
        _load("synthetic_niah", documents=3)
    with pytest.raises(ConfigError, match="dataset.hop_order"):
        _load("synthetic_kv", hop_order="forward")


def test_a_count_is_needed_and_the_seed_must_be_an_integer():
    with pytest.raises(ConfigError, match="set dataset.n .* or dataset.n_samples"):
        load_samples({"name": "synthetic_kv", "n_samples": None, "seed": 1})
    with pytest.raises(ConfigError, match="dataset.seed='x'"):
        load_samples({"name": "synthetic_kv", "n_samples": 2, "seed": "x"})


def test_the_dataset_configs_compose_with_their_defaults():
    from kvprime.config.compose import compose

    for task in GOLDEN:
        cfg = compose([f"dataset={task}", "dataset.n_samples=2"])
        # the ids carry a digest of every knob: the YAML's values and the loader's defaults are the same
        assert [s.sample_id for s in load_samples(cfg["dataset"]).samples] == \
            [s.sample_id for s in load_samples({"name": task, "n_samples": 2, "seed": 42}).samples]


# ------------------------------------------------------------ the Sample fields (item 2)


def test_samples_without_the_new_fields_keep_their_record_byte_for_byte():
    single = Sample("s1", "A passage.", "Q?", "A", answers=("A",), source="x")
    multi = Sample("s2", "B.", "Q?", "A", answers=("A",), passages=("A.", "B."), gold_slot=1, article="t")
    assert json.dumps(single.to_dict()) == ('{"sample_id": "s1", "passage": "A passage.", "query": "Q?", "answer": '
                                            '"A", "answers": ["A"], "source": "x", "random_query": null}')
    assert json.dumps(multi.to_dict()) == ('{"sample_id": "s2", "passage": "B.", "query": "Q?", "answer": "A", '
                                           '"answers": ["A"], "source": "", "random_query": null, "passages": '
                                           '["A.", "B."], "article": "t", "gold_slot": 1}')


def test_gold_slots_and_task_info_are_recorded_hashable_and_read_back():
    s = Sample("s", "B.", "Q?", "A", passages=["A.", "B.", "C."], gold_slot=1, gold_slots=[1, 2],
               task_info={"depth": 0.5, "facts": [{"slot": 1, "word": 3}]})
    assert s.gold_slots == (1, 2) and s.info == {"depth": 0.5, "facts": [{"slot": 1, "word": 3}]}
    assert hash(s) == hash(Sample.from_dict(json.loads(json.dumps(s.to_dict()))))
    d = s.to_dict()
    assert d["gold_slots"] == [1, 2] and d["task_info"] == {"depth": 0.5, "facts": [{"slot": 1, "word": 3}]}
    assert Sample.from_dict(d) == s
    # the same mapping in another key order is the same sample
    assert Sample("s", "B.", "Q?", "A", task_info={"b": 1, "a": 2}) == Sample("s", "B.", "Q?", "A",
                                                                              task_info={"a": 2, "b": 1})
    with pytest.raises(AttributeError):
        s.task_info = "{}"


# ------------------------------------------------------------ multi-gold samples in experiment=multidoc (item 6)


def _multidoc(tmp, *extra):
    return ["experiment=multidoc", "model=tiny_random_llama", "dataset=synthetic_twohop", "dataset.n_samples=3",
            *[f"dataset.{k}={v}" for k, v in PINNED["synthetic_twohop"].items()],
            "multidoc.k=1", "stats.n_boot=1000", "progress=false", "generation.model=null",
            "generation.max_new_tokens=4", "answer.max_new_tokens=4", "save_tokens=true",
            f"generation.store={tmp / 'store'}", *extra]


@pytest.fixture(scope="module")
def twohop_run(tmp_path_factory):
    from kvprime.config.compose import compose
    from kvprime.pipeline import runner

    tmp = tmp_path_factory.mktemp("twohop")
    runner.run_experiment(compose(_multidoc(tmp)), tmp / "run")
    return tmp


def test_a_multidoc_run_records_both_gold_documents_and_the_fact_positions(twohop_run):
    from kvprime.files.results_io import read_jsonl

    inputs = read_jsonl(twohop_run / "run" / "inputs.jsonl")
    assert [Sample.from_dict(r) for r in inputs] == _load("synthetic_twohop", 3)
    for r in inputs:
        assert len(r["gold_slots"]) == 2 and r["gold_slot"] == r["gold_slots"][0]
        assert r["task_info"]["hops"] == r["gold_slots"] and len(r["task_info"]["facts"]) == 6


def test_every_document_is_primed_by_query_static_and_random_sources_and_its_own_generated_one(twohop_run):
    from kvprime.files.results_io import read_jsonl

    scores = {(r["sample_id"], r["condition"]): r for r in read_jsonl(twohop_run / "run" / "scores.jsonl")}
    for sample in _load("synthetic_twohop", 3):
        bare = scores[(sample.sample_id, "independent")]
        documents = len(bare["segment_token_ids"]["document"])
        for name in ("primed_query", "primed_static", "primed_random"):
            row = scores[(sample.sample_id, name)]
            prefix = len(row["segment_token_ids"]["prefix"])
            # [sink, prefix, document_i] encoded for each of the three documents: the surrogate before every one
            assert prefix > 0 and row["encoded_tokens"] == 3 * (1 + prefix) + documents, name
        assert scores[(sample.sample_id, "primed_query")]["surrogate"] == sample.query
    # one generated surrogate per passage, distractors included: 3 samples x 3 documents in the store
    entries = [p for p in (twohop_run / "store").rglob("*.json")]
    assert len(entries) == 9


def test_sibling_query_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """No two questions of these data sets share a context, so there is no sibling question: refused with the
    reason, before any weights load (and group_by_passage, which sibling_query asks for, is refused by the
    loader with its own reason)."""
    from kvprime.config.compose import compose
    from kvprime.models import loading as models
    from kvprime.pipeline import runner

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("model weights were loaded"))
    with pytest.raises(ConfigError, match="sibling_query .* only selected question of their passage"):
        runner.run_experiment(compose(_multidoc(tmp_path, "condition=reuse/truncated_sibling")), tmp_path / "a",
                              only="reuse/truncated_sibling")
    with pytest.raises(ConfigError, match="group_by_passage=true .* no two samples share a passage"):
        runner.run_experiment(compose(_multidoc(tmp_path, "dataset.group_by_passage=true")), tmp_path / "b")


# ------------------------------------------------------------ the prompt, on the real SmolLM2 (item 2's measurement)


@pytest.mark.slow
def test_smollm2_answers_the_value_within_16_tokens_after_a_question_prompt_not_after_multidocs():
    """Why the question carries "Answer with the number only." and the conditions for these tasks need the
    "Question: {query}\\nAnswer:" prompt: with it SmolLM2 gives the needle's value within 16 new tokens (19 of the
    first 20 measured), while multidoc's "Query: {query}\\n\\nAnswer:" makes it end its turn at once."""
    from kvprime import Engine
    from kvprime.analysis.answer_quality import score_fields
    from kvprime.builders.conditions import ConditionSpec
    from kvprime.cache import answers

    engine = Engine.load("smollm2_135m_instruct")
    samples = _load("synthetic_niah", 8)

    def decode(prompt_template):
        spec = ConditionSpec("joint", builder="joint", document_template="Document:\n{document}\n\n",
                             prompt_template=prompt_template)
        items = []
        for s in samples:
            seg = engine.segments(spec, document=s.passage, query=s.query, answer=s.answer, documents=s.documents)
            items.append((engine.build(spec, seg), seg.prompt))
        return answers.decode_many(engine.model, engine.tokenizer, items, max_new_tokens=16)

    question = decode("Question: {query}\nAnswer:")
    assert sum(score_fields(d.text, [s.answer])["exact_match"] for s, d in zip(samples, question, strict=True)) >= 6
    assert max(d.n_tokens for d in question) <= 16 and all(d.stop == "newline" for d in question)
    assert sum(not d.text for d in decode("Query: {query}\n\nAnswer:")) >= 6
