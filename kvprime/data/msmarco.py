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

SOURCE = "msmarco_v11"
HUB_ID = "microsoft/ms_marco"
NO_ANSWER = "No Answer Present."
MODES = ("exp21", "walkthrough")
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _open_dataset(path, split: str, cache_dir):
    """Return an iterable of v1.1 records, turning every failure into one readable error."""
    # Imported here: `datasets` is slow to import and only this loader needs it.
    import datasets

    if path is None:
        try:
            return datasets.load_dataset(HUB_ID, "v1.1", split=split, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - any hub/cache failure gets the same remedy
            raise UnavailableError(
                f"Could not load MS MARCO v1.1 (split {split!r}) from the HuggingFace hub: the hub "
                f"could not be reached and no cached copy was found ({type(err).__name__}: {err}). "
                "Set dataset.path=/path/to/msmarco.jsonl to load a local copy in the v1.1 schema "
                "(.json/.jsonl/.parquet with query, query_id, answers, wellFormedAnswers, passages)."
            ) from err
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"MS MARCO file not found: {p} (from dataset.path).")
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"MS MARCO file {p} must end in one of {', '.join(_FORMATS)}.")
    try:
        return datasets.load_dataset(fmt, data_files=str(p), split="train", cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - a parse error deep in datasets is not actionable as is
        raise UnavailableError(
            f"Could not read the MS MARCO file {p} as {fmt} in the v1.1 schema "
            f"({type(err).__name__}: {err})."
        ) from err


def _real(texts) -> list[str]:
    # Some v1.1 rows carry the literal string "[]" for "no well-formed answer" (see notebook 004).
    return [t for t in (texts or []) if t and t.strip() and t.strip() != "[]"]


def _record(item: Mapping, mode: str) -> Sample | Rejection:
    if item.get("query_id") is None:
        raise DataError(f"MS MARCO record without query_id (query {item.get('query')!r}); not v1.1 schema")
    source_id = str(item["query_id"])
    passages = item.get("passages") or {}
    texts = list(passages.get("passage_text") or [])
    answers = list(item.get("answers") or [])
    query = item.get("query") or ""
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
    )


@register_loader("msmarco_v11")
def load_msmarco(cfg: Mapping) -> Iterator[Sample | Rejection]:
    """Yield one Sample (or Rejection) per v1.1 record, in source order.

    Options: `path` (local .json/.jsonl/.parquet in the v1.1 schema; null = the hub),
    `split` (hub split, default "validation"), `mode` ("exp21" or "walkthrough"),
    `cache_dir` (datasets cache; null = the datasets default).
    """
    mode = cfg.get("mode") or "exp21"
    if mode not in MODES:
        raise DataError(f"Unknown msmarco_v11 mode {mode!r}; valid modes: {', '.join(MODES)}.")
    records = _open_dataset(cfg.get("path"), cfg.get("split") or "validation", cfg.get("cache_dir"))
    for item in records:
        yield _record(item, mode)
