"""Every data problem is the user's error, named: each file-reading loader (JSONL, SQuAD JSON, MS MARCO as JSON
Lines, as a JSON array and as parquet) is fed each problem through ``load_samples``, and the DataError names the
file, the line or the record's place in it, and the field."""

from __future__ import annotations

import codecs
import dataclasses
import json
import os

import pytest
from fixtures import cli

from kvprime.data import load_samples
from kvprime.errors import DataError

QUESTION = "Where does the café river flow?"  # row 1's query: the one non-ASCII character of every file


def _rows(n: int = 3) -> list[dict]:
    return [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city and into the sea.",
             "query": QUESTION if i == 1 else f"Where does river {i} flow?", "answer": f"into the sea {i}"}
            for i in range(n)]


class Format:
    """How one loader's files hold the generic rows: the native record of a row, the dict in it that holds the
    question (``field``), the file's bytes, and how a message names the place of record ``i``."""

    loader, suffix, field, text = "", "", "query", True

    def native(self, row: dict):
        return dict(row)

    def holder(self, record) -> dict:
        return record

    def set_record(self, record, value):
        return value

    def dump(self, records: list) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    def where(self, i: int) -> str:
        return f"line {i + 1}"

    def write(self, path, records: list) -> None:
        path.write_text(self.dump(records), encoding="utf-8")

    def cfg(self, path, tmp_path) -> dict:
        return {"name": self.loader, "path": str(path)}


class Jsonl(Format):
    loader, suffix = "jsonl", ".jsonl"


class Squad(Format):
    loader, suffix, field = "squad_v11", ".json", "question"

    def native(self, row):
        qa = {"id": row["id"], "question": row["query"], "answers": [{"text": row["answer"], "answer_start": 0}]}
        return {"title": f"article {row['id']}", "paragraphs": [{"context": row["passage"], "qas": [qa]}]}

    def holder(self, record):
        return record["paragraphs"][0]["qas"][0]

    def set_record(self, record, value):
        record["paragraphs"][0]["qas"][0] = value
        return record

    def dump(self, records):
        return json.dumps({"version": "1.1", "data": records}, indent=1, ensure_ascii=False)  # a value a line

    def where(self, i):
        return f"data[{i}].paragraphs[0].qas[0]"


class MarcoLines(Format):
    loader, suffix = "msmarco_v11", ".jsonl"

    def native(self, row):
        return {"query_id": row["id"], "query": row["query"], "answers": [row["answer"]], "wellFormedAnswers": [],
                "passages": {"passage_text": [row["passage"]], "is_selected": [1]}}

    def cfg(self, path, tmp_path):
        return {"name": self.loader, "path": str(path), "mode": "exp21", "cache_dir": str(tmp_path / "hf")}


class MarcoArray(MarcoLines):
    suffix = ".json"

    def dump(self, records):
        return json.dumps(records, indent=1, ensure_ascii=False)

    def where(self, i):
        return f"[{i}]"


class MarcoParquet(MarcoLines):
    suffix, text = ".parquet", False

    def write(self, path, records):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.Table.from_pylist([self.native(r) for r in _rows(1)]).schema
        pq.write_table(pa.Table.from_pylist(records, schema=None if records else schema), path)

    def where(self, i):
        return f"row {i}"


FORMATS = {"jsonl": Jsonl(), "squad_v11": Squad(), "msmarco_v11.jsonl": MarcoLines(),
           "msmarco_v11.json": MarcoArray(), "msmarco_v11.parquet": MarcoParquet()}


def _records(fmt: Format, rows=None) -> list:
    return [fmt.native(r) for r in (rows or _rows())]


def _line_of(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


# Each problem writes the file and returns the parts the message must name besides the file.
def latin1(fmt, path):
    text = fmt.dump(_records(fmt))
    path.write_bytes(text.encode("latin-1"))
    return ["not UTF-8", "byte 0xe9", f"line {_line_of(text, 'café')}", "UTF-8, with or without a byte-order mark"]


def malformed_json(fmt, path):
    text = fmt.dump(_records(fmt))
    path.write_text(text.replace(json.dumps(QUESTION, ensure_ascii=False), "Where?"), encoding="utf-8")
    return ["not valid JSON", f"line {_line_of(text, QUESTION)}"]


def duplicate_ids(fmt, path):
    rows = _rows()
    rows[2]["id"] = "s0"
    fmt.write(path, _records(fmt, rows))
    return ["'s0'", fmt.where(0), fmt.where(2)]


def missing_field(fmt, path):
    records = _records(fmt)
    if isinstance(fmt, MarcoParquet):  # a table's column is in every row or in none: the first row is named
        records = [{k: v for k, v in r.items() if k != fmt.field} for r in records]
        fmt.write(path, records)
        return [fmt.where(0), f"missing field {fmt.field!r}"]
    del fmt.holder(records[1])[fmt.field]
    fmt.write(path, records)
    return [fmt.where(1), f"missing field {fmt.field!r}"]


def wrong_type(fmt, path):
    records = _records(fmt)
    if isinstance(fmt, MarcoParquet):  # a column has one type: every row's query is a number
        for r in records:
            r[fmt.field] = 5
        fmt.write(path, records)
        return [fmt.where(0), f"field {fmt.field!r} must be a string, got a number 5"]
    fmt.holder(records[1])[fmt.field] = 5
    fmt.write(path, records)
    return [fmt.where(1), f"field {fmt.field!r} must be a string, got a number 5"]


def not_an_object(fmt, path):
    records = _records(fmt)
    records[1] = fmt.set_record(records[1], [1, 2])
    fmt.write(path, records)
    return [fmt.where(1), "got an array [1, 2]"]


def empty_file(fmt, path):
    fmt.write(path, [])
    return ["holds no record"]


def not_parquet(fmt, path):
    path.write_bytes(b"this is not a parquet table\n")
    return ["not a readable parquet file"]


TEXT_ONLY = (latin1, malformed_json, not_an_object)
PROBLEMS = [latin1, malformed_json, duplicate_ids, missing_field, wrong_type, not_an_object, empty_file, not_parquet]
CASES = [(f, p) for f in FORMATS for p in PROBLEMS
         if (FORMATS[f].text or p not in TEXT_ONLY) and (p is not not_parquet or not FORMATS[f].text)]


@pytest.mark.parametrize("fmt_name, problem", CASES, ids=[f"{f}-{p.__name__}" for f, p in CASES])
def test_each_data_problem_names_the_file_the_place_and_the_field(tmp_path, fmt_name, problem):
    fmt = FORMATS[fmt_name]
    path = tmp_path / f"data{fmt.suffix}"
    fmt.write(path, _records(fmt))
    assert len(load_samples(fmt.cfg(path, tmp_path)).samples) == 3  # the file before the problem is fine
    expected = problem(fmt, path)
    with pytest.raises(DataError) as info:
        load_samples(fmt.cfg(path, tmp_path))
    message = str(info.value)
    for part in [str(path), *expected]:
        assert part in message, (part, message)


@pytest.mark.parametrize("fmt_name", [f for f in FORMATS if FORMATS[f].text])
def test_a_byte_order_mark_is_read_as_utf8(tmp_path, fmt_name):
    fmt = FORMATS[fmt_name]
    (tmp_path / "plain").mkdir(), (tmp_path / "marked").mkdir()
    plain, marked = tmp_path / "plain" / f"data{fmt.suffix}", tmp_path / "marked" / f"data{fmt.suffix}"  # jsonl: source
    fmt.write(plain, _records(fmt))
    marked.write_bytes(codecs.BOM_UTF8 + plain.read_bytes())
    got = load_samples(fmt.cfg(marked, tmp_path)).samples
    assert got == load_samples(fmt.cfg(plain, tmp_path)).samples and got[1].query == QUESTION


def test_a_squad_file_without_a_question_is_refused(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": []}]}))
    with pytest.raises(DataError, match=r"dev\.json holds no record \(no article has a question\)"):
        load_samples({"name": "squad_v11", "path": str(path)})


def test_the_origin_is_carried_but_never_recorded(tmp_path):
    fmt = FORMATS["jsonl"]
    path = tmp_path / "data.jsonl"
    fmt.write(path, _records(fmt))
    sample = load_samples({"name": "jsonl", "path": str(path)}).samples[1]
    assert sample.origin == f"{path}, line 2"
    # inputs.jsonl is written from to_dict and compared byte for byte on resume: the origin is not in it.
    assert sample.to_dict() == {"sample_id": "s1", "passage": _rows()[1]["passage"], "query": QUESTION,
                                "answer": "into the sea 1", "answers": ["into the sea 1"], "source": "data",
                                "random_query": None}
    elsewhere = dataclasses.replace(sample, origin=f"{path}, line 7")  # the same record moved in its file
    assert elsewhere == sample and hash(elsewhere) == hash(sample) and "line" not in repr(sample)


def test_a_plugin_loader_without_origins_still_names_both_records():
    from kvprime.data import LOADERS, OPTIONS, Sample, register_loader

    @register_loader("twice_test", options=())
    def twice(cfg):
        yield from (Sample("same", "p", "q", "a"), Sample("other", "p", "q", "a"), Sample("same", "p", "q", "a"))

    try:
        with pytest.raises(DataError, match=r"'same'.*record 1 of loader 'twice_test' and record 3 of loader"):
            load_samples({"name": "twice_test"})
    finally:
        LOADERS.pop("twice_test")
        OPTIONS.pop("twice_test")


def test_a_loader_that_gives_no_record_is_refused_naming_its_source(tmp_path):
    from kvprime.data import LOADERS, OPTIONS, register_loader

    @register_loader("nothing_test", options=("path",))
    def nothing(cfg):
        yield from ()

    try:
        with pytest.raises(DataError, match=r"dataset 'nothing_test' \(dataset\.path=/some/where\) gave no record"):
            load_samples({"name": "nothing_test", "path": "/some/where"})
    finally:
        LOADERS.pop("nothing_test")
        OPTIONS.pop("nothing_test")


@pytest.mark.integration
def test_the_cli_refuses_a_latin1_file_with_one_paragraph_and_exit_2(tmp_path):
    path = tmp_path / "samples.jsonl"
    latin1(FORMATS["jsonl"], path)
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = cli.run(["run", "dataset=jsonl", f"dataset.path={path}",
                   "model=tiny_random_llama", "progress=false"],
                  env=env, cwd=tmp_path, timeout=600)
    message = " ".join(out.stderr.split())
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "internal error" not in message
    assert f"{path}, line 2: not UTF-8: byte 0xe9 at column" in message, message
