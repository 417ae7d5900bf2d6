"""Local-file loaders for HotpotQA, 2WikiMultihopQA, MuSiQue and LongBench (kvprime.data.multihop and .longbench,
issue 23 item 5): each test writes a small fixture in the format's documented shape and loads it through
load_samples; every malformed field is one paragraph naming the file, the record and the field; the hub path
is checked offline by its error."""

import json
import os

import pytest
from fixtures import cli

from kvprime.data import load_samples
from kvprime.errors import ConfigError, DataError, MissingFileError, UnavailableError

# HotpotQA's README ("JSON Format"): a list of {_id, question, answer, supporting_facts: [[title, sent_id]],
# context: [[title, [sentences]]]}, type and level besides. Sentences after the first start with a space.
HOTPOT = [
    {"_id": "5a8b57f25542995d1e6f1371", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
     "answer": "yes", "type": "comparison", "level": "hard",
     "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
     "context": [["Adam Collis", ["Adam Collis is an American filmmaker and actor.", " He attended Duke."]],
                 ["Ed Wood (film)", ["Ed Wood is a 1994 American biopic."]],
                 ["Scott Derrickson", ["Scott Derrickson is an American director.", " He lives in Los Angeles."]],
                 ["Ed Wood", ["Edward Davis Wood Jr. was an American filmmaker."]]]},
    {"_id": "5a8c7595554299585d9e36b6", "question": "What government position was held by the woman?",
     "answer": "Chief of Protocol", "type": "bridge", "level": "medium",
     "supporting_facts": [["Kiss and Tell (1945 film)", 0], ["Shirley Temple", 0], ["Shirley Temple", 1]],
     "context": [["Shirley Temple", ["Shirley Temple Black was an actress.", " She was Chief of Protocol."]],
                 ["Kiss and Tell (1945 film)", ["Kiss and Tell is a comedy starring Shirley Temple."]],
                 ["Janet Waldo", ["Janet Waldo was a voice actress."]]]},
]
# 2WikiMultihopQA's README: HotpotQA's format plus evidences, type and entity_ids; no leading spaces.
TWOWIKI = [
    {"_id": "8813f87c0bdd11eba7f7acde48001122", "type": "compositional",
     "question": "Who is the mother of the director of film Polish-Russian War?",
     "context": [["Maheen Khan", ["Maheen Khan is a Pakistani fashion designer."]],
                 ["Xawery Żuławski", ["Xawery Żuławski is a Polish film director.", "His mother is Małgorzata "
                                                                                     "Braunek."]],
                 ["Polish-Russian War (film)", ["Polish-Russian War is a 2009 Polish film.",
                                                "It was directed by Xawery Żuławski."]]],
     "supporting_facts": [["Polish-Russian War (film)", 1], ["Xawery Żuławski", 1]],
     "evidences": [["Polish-Russian War", "director", "Xawery Żuławski"],
                   ["Xawery Żuławski", "mother", "Małgorzata Braunek"]],
     "answer": "Małgorzata Braunek", "entity_ids": "Q7209459_Q5393893"},
]
# MuSiQue (JSON Lines, as its evaluate_v1.0.py reads them): paragraphs with idx/title/paragraph_text/
# is_supporting, answer_aliases, answerable, question_decomposition with paragraph_support_idx (hop order).
MUSIQUE = [
    {"id": "2hop__460946_294723", "question": "Who is the spouse of the Green performer?",
     "paragraphs": [{"idx": 0, "title": "Grant's First Stand", "paragraph_text": "A jazz album.",
                     "is_supporting": False},
                    {"idx": 1, "title": "Miquette Giraudy", "paragraph_text": "She married Steve Hillage.",
                     "is_supporting": True},
                    {"idx": 2, "title": "Green (album)", "paragraph_text": "Green is by Steve Hillage.",
                     "is_supporting": True}],
     "question_decomposition": [{"id": 460946, "question": "Green >> performer", "answer": "Steve Hillage",
                                 "paragraph_support_idx": 2},
                                {"id": 294723, "question": "#1 >> spouse", "answer": "Miquette Giraudy",
                                 "paragraph_support_idx": 1}],
     "answer": "Miquette Giraudy", "answer_aliases": ["Miquette"], "answerable": True},
    {"id": "2hop__1_2", "question": "Who founded it?",
     "paragraphs": [{"idx": 0, "title": "T", "paragraph_text": "Nothing useful.", "is_supporting": False}],
     "question_decomposition": [], "answer": "Someone", "answer_aliases": [], "answerable": False},
]
# LongBench's README ("Data Format"): input, context, answers, length, dataset, language, all_classes, _id; the
# multi-document subsets mark passages "Passage N:\n".
LONGBENCH = [
    {"input": "Which film came out first?", "context": "Passage 1:\nBlind Shaft\nA 2003 film.\nPassage 2:\nThe Mask "
     "Of Fu Manchu\nA 1932 film.\nPassage 3:\nOther\nUnrelated.", "answers": ["The Mask Of Fu Manchu"],
     "length": 14, "dataset": "2wikimqa", "language": "en", "all_classes": None, "_id": "lb-1"},
    {"input": "What is the story about?", "context": "A single long story with no passage markers.",
     "answers": ["a story", "the story"], "length": 9, "dataset": "narrativeqa", "language": "en",
     "all_classes": None, "_id": "lb-2"},
]


def _json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _load(name, path, **options):
    return load_samples({"name": name, "path": str(path), "n_samples": None, "seed": 42, **options})


# ------------------------------------------------------------ each format


def test_hotpotqa_documents_gold_slots_answers_and_ids(tmp_path):
    loaded = _load("hotpotqa", _json(tmp_path / "hotpot_dev_distractor_v1.json", HOTPOT))
    first, second = loaded.samples
    assert [s.sample_id for s in loaded.samples] == ["5a8b57f25542995d1e6f1371", "5a8c7595554299585d9e36b6"]
    assert first.passages == ("Adam Collis\nAdam Collis is an American filmmaker and actor. He attended Duke.",
                              "Ed Wood (film)\nEd Wood is a 1994 American biopic.",
                              "Scott Derrickson\nScott Derrickson is an American director. He lives in Los Angeles.",
                              "Ed Wood\nEdward Davis Wood Jr. was an American filmmaker.")
    assert first.gold_slots == (2, 3) and first.gold_slot == 2 and first.passage == first.passages[2]
    assert first.query == HOTPOT[0]["question"] and first.answer == "yes" and first.answers == ("yes",)
    assert first.source == "hotpotqa" and first.info["type"] == "comparison" and first.info["level"] == "hard"
    assert first.info["supporting_facts"] == [["Scott Derrickson", 0], ["Ed Wood", 0]]
    assert second.gold_slots == (1, 0)  # evidence order: the film first, then the actress
    assert first.origin.endswith("hotpot_dev_distractor_v1.json, [0]")


def test_2wikimultihopqa_keeps_the_evidence_triples(tmp_path):
    (s,) = _load("2wikimultihopqa", _json(tmp_path / "dev.json", TWOWIKI)).samples
    assert s.sample_id == "8813f87c0bdd11eba7f7acde48001122" and s.answer == "Małgorzata Braunek"
    assert s.gold_slots == (2, 1) and len(s.passages) == 3
    assert s.passages[1] == ("Xawery Żuławski\nXawery Żuławski is a Polish film director. His mother is "
                             "Małgorzata Braunek.")
    assert s.info["evidences"][1] == ["Xawery Żuławski", "mother", "Małgorzata Braunek"]
    assert s.info["type"] == "compositional"


def test_musique_gold_in_hop_order_aliases_kept_unanswerable_rejected(tmp_path):
    loaded = _load("musique", _jsonl(tmp_path / "musique_full_v1.0_dev.jsonl", MUSIQUE))
    (s,) = loaded.samples
    assert s.sample_id == "2hop__460946_294723" and s.answers == ("Miquette Giraudy", "Miquette")
    assert s.passages == ("Grant's First Stand\nA jazz album.", "Miquette Giraudy\nShe married Steve Hillage.",
                          "Green (album)\nGreen is by Steve Hillage.")
    assert s.gold_slots == (2, 1)  # the decomposition's hop order, not the paragraphs'
    assert s.info["paragraph_idx"] == [0, 1, 2]
    assert loaded.rejected == [{"source_id": "2hop__1_2", "reason": "answerable is false (a MuSiQue-Full contrast "
                                "record: its context lacks a supporting paragraph, so it has no gold answer to "
                                "score)"}]


def test_longbench_splits_passages_and_keeps_every_answer(tmp_path):
    multi, single = _load("longbench", _jsonl(tmp_path / "2wikimqa.jsonl", LONGBENCH)).samples
    assert multi.sample_id == "lb-1" and multi.query == "Which film came out first?"
    assert multi.passages == ("Blind Shaft\nA 2003 film.", "The Mask Of Fu Manchu\nA 1932 film.", "Other\nUnrelated.")
    assert multi.gold_slots == () and multi.gold_slot is None and multi.passage == multi.passages[0]
    assert multi.source == "2wikimqa" and multi.info == {"dataset": "2wikimqa", "length": 14, "language": "en",
                                                         "passage_numbers": [1, 2, 3]}
    assert single.passages == () and single.passage == LONGBENCH[1]["context"]
    assert single.answer == "a story" and single.answers == ("a story", "the story")
    whole = _load("longbench", tmp_path / "2wikimqa.jsonl", split_passages=False).samples[0]
    assert whole.passages == () and whole.passage == LONGBENCH[0]["context"]


def test_the_hub_column_wise_hotpot_rows_read_the_same(tmp_path):
    """The hub's hotpot_qa stores context and supporting_facts column-wise and names the id `id`."""
    row = dict(HOTPOT[0])
    row["id"] = row.pop("_id")
    row["context"] = {"title": [t for t, _ in HOTPOT[0]["context"]], "sentences": [s for _, s in HOTPOT[0]["context"]]}
    row["supporting_facts"] = {"title": ["Scott Derrickson", "Ed Wood"], "sent_id": [0, 0]}
    (hub,) = _load("hotpotqa", _jsonl(tmp_path / "hub_rows.jsonl", [row])).samples
    (local,) = _load("hotpotqa", _json(tmp_path / "local.json", HOTPOT[:1])).samples
    assert hub == local and hub.origin.endswith("line 1")


def test_shuffled_order_is_seeded_per_sample_and_keeps_the_gold_documents(tmp_path):
    path = _json(tmp_path / "h.json", HOTPOT)
    source = _load("hotpotqa", path).samples
    runs = [_load("hotpotqa", path, order="shuffled").samples for _ in range(2)]
    assert runs[0] == runs[1]
    orders = [_load("hotpotqa", path, order="shuffled", seed=seed).samples[0].info["source_index"]
              for seed in range(8)]
    assert len({tuple(o) for o in orders}) > 1
    for s, base in zip(runs[0], source, strict=True):
        assert sorted(s.passages) == sorted(base.passages)
        assert [s.passages[g] for g in s.gold_slots] == [base.passages[g] for g in base.gold_slots]
        assert [s.passages[i] for i in range(len(s.passages))] == [base.passages[j] for j in s.info["source_index"]]


def test_a_supporting_title_missing_from_the_context_is_rejected_with_its_reason(tmp_path):
    bad = json.loads(json.dumps(HOTPOT[0]))
    bad["supporting_facts"][1][0] = "Ed Woody"
    loaded = _load("hotpotqa", _json(tmp_path / "h.json", [bad, HOTPOT[1]]))
    assert [s.sample_id for s in loaded.samples] == [HOTPOT[1]["_id"]]
    assert loaded.rejected[0]["reason"] == ("supporting fact title 'Ed Woody' is not among the context's paragraph "
                                            "titles")


# ------------------------------------------------------------ malformed fields: file, record and field named


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


def _with(record, **changes):
    return {**json.loads(json.dumps(record)), **changes}


MALFORMED = [
    ("hotpotqa", "json", [HOTPOT[0], _without(HOTPOT[1], "context")], r"h\.json, \[1\]: missing field 'context'"),
    ("hotpotqa", "json", [_without(HOTPOT[0], "answer")], r"\[0\]: missing field 'answer' \(.*a test-set file"),
    ("hotpotqa", "json", [_with(HOTPOT[0], supporting_facts=[["Ed Wood", "zero"]])],
     r"\[0\]: field 'supporting_facts' must be a list of \[title, sent_id\] pairs, got an array"),
    ("hotpotqa", "json", [_with(HOTPOT[0], context=[["Adam Collis", "one string"]])],
     r"\[0\]: field 'context' must be a list of \[title, \[sentences\]\] pairs"),
    ("hotpotqa", "json", [_with(HOTPOT[0], question=7)], r"\[0\]: field 'question' must be a string, got a number 7"),
    ("hotpotqa", "json", [HOTPOT[0], "not a record"], r"\[1\]: expected a HotpotQA-format record"),
    ("2wikimultihopqa", "json", [_without(TWOWIKI[0], "_id")], r"\[0\]: missing field '_id'"),
    ("musique", "jsonl", [MUSIQUE[0], _without(MUSIQUE[0], "paragraphs")],
     r"h\.json, line 2: missing field 'paragraphs'"),
    ("musique", "jsonl", [_with(MUSIQUE[0], paragraphs=[{"idx": 0, "title": "T", "paragraph_text": "x"}])],
     r"line 1, paragraphs\[0\]: missing field 'is_supporting'"),
    ("musique", "jsonl", [_with(MUSIQUE[0], answer_aliases="Miquette")],
     r"line 1: field 'answer_aliases' must be a list of strings, got a string"),
    ("musique", "jsonl", [_with(MUSIQUE[0], answerable="yes")], r"line 1: field 'answerable' must be true or false"),
    ("longbench", "jsonl", [_with(LONGBENCH[0], answers="Blind Shaft")],
     r"line 1: field 'answers' must be a list of strings, got a string"),
    ("longbench", "jsonl", [LONGBENCH[1], _without(LONGBENCH[0], "input")], r"line 2: missing field 'input'"),
    ("longbench", "jsonl", [_with(LONGBENCH[0], length="14")], r"line 1: field 'length' must be an integer"),
]


@pytest.mark.parametrize("loader, shape, records, match", MALFORMED)
def test_a_malformed_field_is_one_paragraph_naming_file_record_and_field(tmp_path, loader, shape, records, match):
    path = (_json if shape == "json" else _jsonl)(tmp_path / "h.json", records)
    with pytest.raises(DataError, match=match) as err:
        _load(loader, path)
    assert str(tmp_path / "h.json") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("loader", ["hotpotqa", "2wikimultihopqa", "musique", "longbench"])
def test_file_problems_are_named(tmp_path, loader):
    with pytest.raises(MissingFileError, match="nothing.json .*not a file"):
        _load(loader, tmp_path / "nothing.json")
    (tmp_path / "empty.json").write_text("\n")
    with pytest.raises(DataError, match="holds no record"):
        _load(loader, tmp_path / "empty.json")
    (tmp_path / "bad.jsonl").write_text('\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, column 2: not valid JSON"):
        _load(loader, tmp_path / "bad.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"_id": "é"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="line 1: not UTF-8"):
        _load(loader, tmp_path / "latin1.jsonl")


def test_a_duplicate_id_names_both_records_and_a_byte_order_mark_is_read(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [MUSIQUE[0], MUSIQUE[0]])
    with pytest.raises(DataError, match=r"Duplicate sample_id '2hop__460946_294723' .*m.jsonl, line 1 and .*m.jsonl, "
                                        r"line 2"):
        _load("musique", path)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(HOTPOT).encode())
    assert [s.sample_id for s in _load("hotpotqa", bom).samples] == [r["_id"] for r in HOTPOT]


def test_options_are_checked(tmp_path):
    path = _json(tmp_path / "h.json", HOTPOT)
    with pytest.raises(ConfigError, match="dataset.order='random' is not accepted"):
        _load("hotpotqa", path, order="random")
    with pytest.raises(ConfigError, match="dataset.path=.* and dataset.hf_dataset=hotpot_qa are both set"):
        _load("hotpotqa", path, hf_dataset="hotpot_qa")
    with pytest.raises(ConfigError, match="neither is set: set dataset.path"):
        load_samples({"name": "musique", "n_samples": 1, "seed": 1})
    with pytest.raises(ConfigError, match="dataset.group_by_passage=true"):
        _load("hotpotqa", path, group_by_passage=True)
    with pytest.raises(ConfigError, match="dataset.split_passages='yes'"):
        _load("longbench", _jsonl(tmp_path / "l.jsonl", LONGBENCH), split_passages="yes")
    with pytest.raises(ConfigError, match="dataset.split_passages"):  # a LongBench option, not HotpotQA's
        _load("hotpotqa", path, split_passages=True)


# ------------------------------------------------------------ the hub path, offline


def test_an_offline_hub_dataset_is_one_paragraph_naming_the_option_and_the_offline_state():
    # conftest sets HF_HUB_OFFLINE=1 before datasets is imported
    with pytest.raises(UnavailableError) as err:
        load_samples({"name": "hotpotqa", "hf_dataset": "hotpot_qa", "hf_config": "distractor",
                      "split": "validation", "n_samples": 2, "seed": 1})
    text = str(err.value)
    assert "dataset.hf_dataset=hotpot_qa (hf_config=distractor, split=validation)" in text
    assert "HF_HUB_OFFLINE is set" in text and "dataset.path=" in text and "\n" not in text


@pytest.mark.integration
def test_the_cli_says_it_in_one_paragraph_with_exit_2_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVPRIME_OUTPUT_ROOT": str(tmp_path)}
    proc = cli.run(["run", "model=tiny_random_llama", "dataset=musique",
                    "dataset.hf_dataset=bdsaglam/musique", "progress=false"],
                   env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dataset.hf_dataset=bdsaglam/musique" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_the_dataset_configs_compose_and_name_their_loader():
    from kvprime.config.compose import compose

    for name in ("hotpotqa", "2wikimultihopqa", "musique", "longbench"):
        cfg = compose([f"dataset={name}", f"dataset.path=/data/{name}.json"])
        assert cfg["dataset"]["name"] == name and cfg["dataset"]["order"] == "source"
