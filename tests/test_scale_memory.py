"""Finalize of a large run holds its inputs, score lines and page data a chunk at a time, with output equal to
reading everything at once: the chunked score frame equals the one-piece frame column for column (dtypes too),
the page's sample data written in pieces equals the template's tojson of the whole, and the inputs are read from
their file on every pass."""

import json

import jinja2
import numpy as np
import pandas as pd
import pytest

from kvprime.files.results_io import JsonlRecords
from kvprime.reporting import finalize, html


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_records_read_the_file_on_every_pass_and_give_fresh_dicts(tmp_path):
    path = _write_jsonl(tmp_path / "inputs.jsonl", [{"sample_id": f"s{i}", "n": i} for i in range(5)])
    path.write_text(path.read_text() + "\n")  # a blank line is not a record
    records = JsonlRecords(path)
    assert len(records) == 5
    first = list(records)
    first[0]["n"] = 99  # a reader that changes a record changes nothing the next reader sees
    assert [r["n"] for r in records] == [0, 1, 2, 3, 4]
    assert records[3] == {"sample_id": "s3", "n": 3} and records[-1]["n"] == 4
    assert [r["n"] for r in records[1:4:2]] == [1, 3]
    with pytest.raises(IndexError):
        records[5]


# Lines whose keys and types differ between chunks of two: a key missing from the first lines, a column that is
# all null in one chunk and numbers in another, ints next to floats, text next to null, and two conditions out of
# plan order (the frame is sorted into run order).
LINES = [
    {"sample_id": "a", "condition": "y", "nll": 1.5, "similarity": None, "surrogate": None, "n": 1},
    {"sample_id": "a", "condition": "x", "nll": 1.0, "similarity": None, "surrogate": None, "n": 2},
    {"sample_id": "b", "condition": "x", "nll": 2.0, "similarity": 0.25, "surrogate": "q b", "n": 3.5},
    {"sample_id": "b", "condition": "y", "nll": None, "similarity": 0.5, "surrogate": "q b", "n": 4,
     "generated_answer": "yes"},
    {"sample_id": "c", "condition": "x", "nll": 3.0, "similarity": None, "surrogate": "q c", "n": 5,
     "exact_match": True},
]


@pytest.mark.parametrize("chunk", [1, 2, 3, len(LINES)])
def test_the_score_frame_read_in_chunks_equals_the_frame_of_all_lines(tmp_path, monkeypatch, chunk):
    run_dir = tmp_path
    _write_jsonl(run_dir / "scores.jsonl", LINES)
    inputs = [{"sample_id": s} for s in ("a", "b", "c")]
    monkeypatch.setattr(finalize, "_LINES_PER_FRAME", len(LINES))
    whole, n_whole = finalize._scores_frame(run_dir, inputs, ["x", "y"])
    monkeypatch.setattr(finalize, "_LINES_PER_FRAME", chunk)
    chunked, n = finalize._scores_frame(run_dir, inputs, ["x", "y"])
    assert n == n_whole == len(LINES)
    assert list(whole["condition"]) == ["x", "y", "x", "y", "x"] and list(whole["sample_id"]) == list("aabbc")
    pd.testing.assert_frame_equal(chunked, whole)  # values, column order and every column's dtype
    assert chunked.to_csv(index=False) == whole.to_csv(index=False)


def test_the_page_data_written_in_pieces_equals_tojson_of_the_whole(monkeypatch):
    hostile = "</script><script>x = 1</script> & 'quoted' <b>"
    inputs = [{"sample_id": f"q{i}", "passage": hostile if i == 1 else f"doc {i}", "query": f"question {i}?",
               "answer": "a", "answers": ["a", f"b{i}"]} for i in range(7)]
    scores = pd.DataFrame([{"sample_id": f"q{i}", "condition": c, "nll": 1.0 + i / 3 + j, "surrogate": f"s {i % 2}",
                            "similarity": np.nan} for i in range(7) if i != 4 for j, c in enumerate(["base", "x"])])
    derived = pd.DataFrame([{"sample_id": "q2", "condition": "routed", "nll": 1.5, "routed_to": "x",
                             "similarity": np.nan}])
    kw = dict(baseline="base", conditions=["base", "x", "routed"], skipped=[{"sample_id": "q4", "reason": "long"}])
    env = html.environment()
    whole = jinja2.utils.htmlsafe_json_dumps(html.sample_data(inputs, scores, derived, **kw),
                                             **env.policies["json.dumps_kwargs"])
    monkeypatch.setattr(html, "_SAMPLES_PER_CHUNK", 2)
    pieces = list(html.sample_json(inputs, scores, derived, **kw))
    assert len(pieces) > 3 and "".join(pieces) == str(whole)
    assert "</script>" not in "".join(pieces)
    data = json.loads("".join(pieces))
    assert [s["id"] for s in data["samples"]] == [f"q{i}" for i in range(7)]
    assert data["samples"][4]["skipped"] == "long" and "scores" not in data["samples"][4] or \
        data["samples"][4]["scores"] == {}
    assert data["samples"][2]["scores"]["routed"]["routed_to"] == "x"
