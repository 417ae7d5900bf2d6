"""Loader for LongBench-style JSON Lines (``dataset.name=longbench``), from a local file or the hub copy.

The format, as the README of github.com/THUDM/LongBench ("Data Format") gives it: every record is an object with
``input`` (the question), ``context`` (one long text), ``answers`` (a list of all true answers), ``length``
(words of the first three for English), ``dataset`` (the subset's name), ``language``, ``all_classes`` (null but
for classification tasks) and ``_id``. Its multi-document QA subsets (hotpotqa, 2wikimqa, musique) join their
passages into ``context`` as "Passage 1:\\n<title>\\n<text>\\nPassage 2:\\n..." (the markers the benchmark's own
readers split on, e.g. ``re.split(r'(Passage \\d+:\\n)', context)``).

Each record becomes one sample: with ``dataset.split_passages=true`` (default) a context with those markers gives
one document per passage (marker dropped, in the file's order or shuffled: ``dataset.order``); a context without
them is a single-passage sample. LongBench marks no supporting passage, so ``gold_slots`` is empty and
``gold_slot`` null, and ``passage`` (what single-passage tools read) is the first passage. Every answer in
``answers`` is a reference (the first is scored for NLL); a record without one is rejected with that reason.
The hub copy is ``dataset.hf_dataset=THUDM/LongBench dataset.hf_config=<subset> dataset.split=test``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from kvprime.data import register_loader
from kvprime.data.types import Rejection, Sample, dedupe

from ..errors import ConfigError
from . import reading
from .multihop import SOURCE_OPTIONS, arrange, check_order, records

LOADER = "longbench"
RECORD = ('a LongBench record: a JSON object with "_id", "input" (the question), "context" (one text) and "answers" '
          '(a list of strings); optionally "dataset", "length", "language", "all_classes"')
# "Passage 1:\n" at the start of the context or of a line.
PASSAGE_MARKER = re.compile(r"(?:^|\n)Passage (\d+):\n")


def split_passages(context: str) -> tuple[list[int], list[str]]:
    """(the passages' numbers, their texts) of a context with "Passage N:" markers; ([], []) without any. Text
    before the first marker (none in LongBench) is dropped only when blank."""
    parts = PASSAGE_MARKER.split(context)
    head, rest = parts[0], parts[1:]
    if not rest:
        return [], []
    numbers = [int(n) for n in rest[0::2]]
    texts = [t.strip() for t in rest[1::2]]
    if head.strip():
        numbers, texts = [0, *numbers], [head.strip(), *texts]
    return numbers, texts


def _optional(record: Mapping, where: str) -> dict:
    """The optional fields, checked by type when present, for task_info."""
    dataset = reading.field(record, "dataset", where, "a string (the subset's name)",
                            lambda v: v is None or reading.is_text(v), required=False)
    length = reading.field(record, "length", where, "an integer (the record's length in words or characters)",
                           lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), required=False)
    language = reading.field(record, "language", where, "a string", lambda v: v is None or reading.is_text(v),
                             required=False)
    return {k: v for k, v in (("dataset", dataset), ("length", length), ("language", language)) if v is not None}


def longbench_sample(record, where: str, cfg: Mapping) -> Sample | Rejection:
    reading.an_object(record, where, RECORD)
    needs = "each LongBench record has _id, input, context and answers"
    key = "_id" if "_id" in record or "id" not in record else "id"
    sid = str(reading.field(record, key, where, "a string or an integer", reading.is_id, needs=needs))
    question = reading.field(record, "input", where, "a string (the question)", reading.is_text, needs=needs)
    context = reading.field(record, "context", where, "a string", reading.is_text, needs=needs)
    refs = reading.field(record, "answers", where, "a list of strings", reading.is_texts, needs=needs)
    info = _optional(record, where)
    answers = dedupe(a for a in refs if a.strip())
    if not answers:
        return Rejection(sid, "no reference answer (answers is empty)")
    numbers, texts = split_passages(context) if cfg.get("split_passages", True) else ([], [])
    source = info.get("dataset") or LOADER
    if not texts:
        return Sample(sample_id=sid, passage=context, query=question, answer=answers[0], answers=answers,
                      source=source, task_info=info, origin=where)
    order = arrange(cfg, LOADER, sid, len(texts))
    return Sample(sample_id=sid, passage=texts[order[0]], query=question, answer=answers[0], answers=answers,
                  source=source, passages=tuple(texts[i] for i in order),
                  task_info={**info, "passage_numbers": [numbers[i] for i in order]}, origin=where)


@register_loader(LOADER, options=(*SOURCE_OPTIONS, "split_passages"))
def load_longbench(cfg: Mapping) -> Iterator[Sample | Rejection]:
    """One sample per LongBench record (module docstring)."""
    if not isinstance(cfg.get("split_passages", True), bool):
        raise ConfigError(f"dataset.split_passages={cfg.get('split_passages')!r} is not accepted: true (a context "
                          "with \"Passage N:\" markers gives one document per passage) or false (one document).")
    if cfg.get("group_by_passage"):
        raise ConfigError("dataset.group_by_passage=true serves one passage's cache to all of its questions, but "
                          "LongBench gives each question its own context. Set dataset.group_by_passage=false.")
    check_order(cfg, LOADER)
    for where, record in records(cfg, LOADER, RECORD):
        yield longbench_sample(record, where, cfg)
