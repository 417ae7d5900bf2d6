"""MS MARCO v1.1 loader, with the two selection rules the notebooks used.

mode "exp21" (notebook 000, cell 8): the first passage and `answers[0]`.
mode "walkthrough" (notebook 004): the well-formed answer when there is one, else `answers[0]`;
the first passage marked `is_selected == 1`; "No Answer Present." is not an answer.
Length filters (000: 20-150 passage words, 2-30 answer words) belong in `dataset.filters`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from kvprime.data import register_loader
from kvprime.data.types import Rejection, Sample, dedupe

from ..errors import DataError, MissingFileError, UnavailableError
from . import reading

SOURCE = "msmarco_v11"
HUB_ID = "microsoft/ms_marco"
NO_ANSWER = "No Answer Present."
MODES = ("exp21", "walkthrough")
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
RECORD = ('one MS MARCO v1.1 record: a JSON object with "query_id", "query", "answers" (a list of strings), '
          '"passages" ({"passage_text": [...], "is_selected": [...]}) and optionally "wellFormedAnswers"')


def _from_hub(split: str, cache_dir) -> Iterator[tuple[str, Mapping]]:
    import datasets  # lazy: datasets is heavy, and only this loader's hub source needs it

    try:
        rows = datasets.load_dataset(HUB_ID, "v1.1", split=split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - any hub/cache failure gets the same remedy
        raise UnavailableError(
            f"Could not load MS MARCO v1.1 (split {split!r}) from the HuggingFace hub: the hub "
            f"could not be reached and no cached copy was found ({type(err).__name__}: {err}). "
            "Set dataset.path=/path/to/msmarco.jsonl to load a local copy in the v1.1 schema "
            "(.json/.jsonl/.parquet with query, query_id, answers, wellFormedAnswers, passages)."
        ) from err
    for i, row in enumerate(rows):
        yield f"{HUB_ID} v1.1 {split}, row {i}", row


def _from_parquet(p: Path) -> Iterator[tuple[str, Mapping]]:
    # pyarrow is the parquet engine `datasets` itself reads with (one of its requirements); read directly, a local
    # table needs no datasets cache, its rows keep their indices, and an empty table is no error of the reader's.
    # lazy: pyarrow comes with datasets (heavy); only a .parquet dataset.path needs it
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(p)
        i = 0
        for batch in table.iter_batches():
            for row in batch.to_pylist():
                yield f"{p}, row {i}", row
                i += 1
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{p}: not a readable parquet file ({type(err).__name__}: {err}). A .parquet dataset.path "
                        "must be a parquet table in the MS MARCO v1.1 schema (query_id, query, answers, "
                        "wellFormedAnswers, passages).") from err


def _from_json(p: Path) -> Iterator[tuple[str, object]]:
    """A JSON array of records, or JSON Lines (one record a line), read as UTF-8 so that every problem names its
    line."""
    if p.suffix.lower() == ".json" and reading.opens_array(p):
        doc = reading.json_document(p, f"a JSON array of records, each {RECORD}")
        if not isinstance(doc, list):
            raise DataError(f"{p}: expected a JSON array of records, got {reading.kind(doc)}.")
        for i, item in enumerate(doc):
            yield f"{p}, [{i}]", item
        return
    for lineno, item in reading.json_lines(p, RECORD):
        yield f"{p}, line {lineno}", item


def _records(path, split: str, cache_dir) -> Iterator[tuple[str, object]]:
    """(where, v1.1 record) pairs, turning every failure into one readable error."""
    if path is None:
        yield from _from_hub(split, cache_dir)
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"MS MARCO file not found: {p} (from dataset.path).")
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"MS MARCO file {p} must end in one of {', '.join(_FORMATS)}.")
    n = 0
    for pair in _from_parquet(p) if fmt == "parquet" else _from_json(p):
        n += 1
        yield pair
    if n == 0 and fmt == "parquet":
        raise reading.no_records(p, "rows in the MS MARCO v1.1 schema (query_id, query, answers, wellFormedAnswers, "
                                    "passages)", "the table has no row")
    if n == 0:
        raise reading.no_records(p, f"a JSON array of records or one record a line, each {RECORD}")


def _real(texts) -> list[str]:
    # Some v1.1 rows carry the literal string "[]" for "no well-formed answer" (see notebook 004).
    return [t for t in (texts or []) if t and t.strip() and t.strip() != "[]"]


def _is_flags(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _checked(item, where: str, mode: str) -> Mapping:
    """The record's fields this loader reads, by name and type (a local file is not trusted to be v1.1)."""
    reading.an_object(item, where, RECORD)
    needs = "each v1.1 record has query_id, query, answers and passages"
    reading.field(item, "query_id", where, "a string or an integer", reading.is_id, needs=needs)
    reading.field(item, "query", where, "a string", reading.is_text, needs=needs)
    reading.field(item, "answers", where, "a list of strings", reading.is_texts, needs=needs)
    reading.field(item, "wellFormedAnswers", where, "a list of strings", lambda v: v is None or reading.is_texts(v),
                  required=False)
    passages = reading.field(item, "passages", where, 'an object {"passage_text": [...], "is_selected": [...]}',
                             lambda v: isinstance(v, dict), needs=needs)
    inner = f"{where}, field 'passages'"
    reading.field(passages, "passage_text", inner, "a list of strings", reading.is_texts,
                  needs="the query's candidate passages")
    reading.field(passages, "is_selected", inner, "a list of 0/1 integers", _is_flags, required=mode == "walkthrough",
                  needs="mode walkthrough takes the passage marked 1")
    return item


def _record(item: Mapping, mode: str, where: str = "") -> Sample | Rejection:
    source_id = str(item["query_id"])
    passages = item["passages"]
    texts = list(passages["passage_text"])
    answers = list(item["answers"])
    query = item["query"]
    if mode == "exp21":
        # Empty fields become "" so that load_samples rejects them with the common reasons.
        return Sample(
            sample_id=source_id,
            passage=texts[0] if texts else "",
            query=query,
            answer=answers[0] if answers else "",
            answers=dedupe(answers),
            source=SOURCE,
            candidates=tuple(texts[1:]),
            origin=where,
        )
    well_formed = _real(item.get("wellFormedAnswers"))
    answer = well_formed[0] if well_formed else (answers[0] if answers else "")
    if answer.strip() == NO_ANSWER:
        return Rejection(source_id, f"answer is {NO_ANSWER!r}")
    selected = list(passages.get("is_selected") or [])
    gold = next((i for i, s in enumerate(selected[:len(texts)]) if s == 1), None)
    if gold is None:
        return Rejection(source_id, "no passage with is_selected == 1")
    passage = texts[gold]
    return Sample(
        sample_id=source_id,
        passage=passage,
        query=query,
        answer=answer,
        answers=dedupe([answer, *well_formed, *(a for a in answers if a.strip() != NO_ANSWER)]),
        source=SOURCE,
        candidates=tuple(t for i, t in enumerate(texts) if i != gold),  # multidoc.distractors=candidates
        origin=where,
    )


@register_loader("msmarco_v11", options=("path", "split", "mode", "cache_dir"))
def load_msmarco(cfg: Mapping) -> Iterator[Sample | Rejection]:
    """Yield one Sample (or Rejection) per v1.1 record, in source order.

    Options: `path` (local .json/.jsonl/.parquet in the v1.1 schema; null = the hub),
    `split` (hub split, default "validation"), `mode` ("exp21" or "walkthrough"),
    `cache_dir` (the hub copy's datasets cache; null = the datasets default).
    """
    mode = cfg.get("mode") or "exp21"
    if mode not in MODES:
        raise DataError(f"Unknown msmarco_v11 mode {mode!r}; valid modes: {', '.join(MODES)}.")
    for where, item in _records(cfg.get("path"), cfg.get("split") or "validation", cfg.get("cache_dir")):
        yield _record(_checked(item, where, mode), mode, where)
