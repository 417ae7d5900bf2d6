"""Loader for a local JSONL file: one {"passage", "query", "answer"} object per line."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from kvprime.data import register_loader
from kvprime.data.types import Sample, dedupe

from ..errors import DataError, MissingFileError
from . import reading

REQUIRED = ("passage", "query", "answer")
RECORD = ('one JSON object with "passage", "query" and "answer" (strings; optional "id", "answers", "passages", '
          '"article")')


def _sample(obj: object, path: Path, lineno: int) -> Sample:
    where = f"{path}, line {lineno}"
    obj = reading.an_object(obj, where, RECORD)
    for key in REQUIRED:
        reading.field(obj, key, where, "a string", reading.is_text, needs=f"each line needs {', '.join(REQUIRED)}")
    extra = reading.field(obj, "answers", where, "a list of strings (further reference answers)",
                          lambda v: v is None or reading.is_texts(v), required=False) or []
    passages = reading.field(obj, "passages", where, "a list of non-empty strings (the context's passages in order, "
                             "the gold one among them)",
                             lambda v: v is None or (reading.is_texts(v) and all(v)), required=False) or []
    article = reading.field(obj, "article", where, "a string (the passage's group)", reading.is_text,
                            required=False)
    sid = reading.field(obj, "id", where, "a string or an integer (or absent: the id is <file stem>:<line>)",
                        lambda v: v is None or reading.is_id(v), required=False)
    return Sample(
        # The line number fallback is stable as long as the file is not edited.
        sample_id=str(sid) if sid is not None else f"{path.stem}:{lineno}",
        passage=obj["passage"],
        query=obj["query"],
        answer=obj["answer"],
        answers=dedupe([obj["answer"], *extra]),
        source=path.stem,
        passages=tuple(passages),
        article=article or "",
        origin=where,
    )


@register_loader("jsonl", options=("path",))
def load_jsonl(cfg: Mapping) -> Iterator[Sample]:
    """Yield one Sample per non-blank line.

    Options: `path` (required). Optional per-line keys: `id` (else "<file stem>:<line number>"),
    `answers` (a list of further references; the scored `answer` is always first) and `passages` (several
    passages in context order, each its own document span; `passage` is then the gold one) and `article` (a
    group of passages: multidoc.distractors=same_article draws from it).
    """
    if cfg.get("path") in (None, "???"):  # "???" is the config's "must be set"
        raise DataError("The jsonl loader needs dataset.path=/path/to/file.jsonl (it is not set).")
    path = Path(cfg["path"]).expanduser()
    if not path.is_file():
        raise MissingFileError(f"JSONL dataset file not found: {path} (from dataset.path).")
    n = 0
    for lineno, obj in reading.json_lines(path, RECORD):
        n += 1
        yield _sample(obj, path, lineno)
    if n == 0:
        raise reading.no_records(path, f"{RECORD} per line")
