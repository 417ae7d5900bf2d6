"""Loader for a local JSONL file: one {"passage", "query", "answer"} object per line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from kvprime.data import register_loader
from kvprime.data.types import Sample, dedupe

from ..errors import DataError, MissingFileError

REQUIRED = ("passage", "query", "answer")


@register_loader("jsonl")
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
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # a trailing newline or a blank separator is not a record
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg}).") from err
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
            for key in REQUIRED:
                if key not in obj:
                    raise DataError(f"{where}: missing field {key!r} (each line needs {', '.join(REQUIRED)}).")
                if not isinstance(obj[key], str):
                    raise DataError(f"{where}: field {key!r} must be a string.")
            extra = obj.get("answers") or []
            if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
                raise DataError(f"{where}: field 'answers' must be a list of strings.")
            passages = obj.get("passages") or []
            if not isinstance(passages, list) or not all(isinstance(x, str) and x for x in passages):
                raise DataError(f"{where}: field 'passages' must be a list of non-empty strings (the context's "
                                "passages in order, the gold one among them).")
            if not isinstance(obj.get("article", ""), str):
                raise DataError(f"{where}: field 'article' must be a string (the passage's group).")
            sid = obj.get("id")
            yield Sample(
                # The line number fallback is stable as long as the file is not edited.
                sample_id=str(sid) if sid is not None else f"{path.stem}:{lineno}",
                passage=obj["passage"],
                query=obj["query"],
                answer=obj["answer"],
                answers=dedupe([obj["answer"], *extra]),
                source=path.stem,
                passages=tuple(passages),
                article=obj.get("article", ""),
            )
