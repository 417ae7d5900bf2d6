"""Record types shared by every loader: one QA sample, one rejection, one load result."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One (passage, query, answer) triple, ready to be primed and scored."""

    sample_id: str  # stable across runs and machines (from the source's own id)
    passage: str
    query: str
    answer: str  # the reference answer that is scored
    answers: tuple[str, ...] = ()  # all reference answers, if the source has several
    source: str = ""  # dataset name
    random_query: str | None = None  # fixed control query (only the synthetic sanity example sets it)
    # Several passages, in context order (e.g. the gold passage among retrieved distractors); empty: just
    # ``passage``. Each becomes its own document span, tokenized alone.
    passages: tuple[str, ...] = ()
    # The source's group of passages (SQuAD: the article title): where same-article distractors come from.
    article: str = ""
    # MS MARCO: the query's other candidate passages (gold excluded), the source's own distractors.
    candidates: tuple[str, ...] = ()
    # Multi-document samples: the gold passage's index in ``passages`` (kvprime.data.distractors).
    gold_slot: int | None = None
    # Samples with several gold passages (multi-hop data, kvprime.data.multihop and .synthetic): every gold
    # passage's index in ``passages``, in the source's evidence order (hop order where it gives one); ``gold_slot``
    # is then the first of them. Empty: the one ``gold_slot`` (or a single-passage sample).
    gold_slots: tuple[int, ...] = ()
    # What a task generator or a source records beside the text (fact positions, depths, hop order), for analyses
    # by slot and depth: a JSON object, kept as its canonical JSON text so that the frozen sample stays hashable
    # (``info`` reads it back; a mapping given is stored as that text). Empty: none.
    task_info: str | Mapping[str, Any] = ""
    # Where the record is in its source ("<file>, line 3", "<file>, data[3].paragraphs[1].qas[0]"), for the
    # messages about it. Not part of the sample: no equality, no record (inputs.jsonl is compared on resume).
    origin: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        # Callers (JSON, datasets rows) hand over lists; a tuple keeps the frozen sample hashable.
        if not isinstance(self.answers, tuple):
            object.__setattr__(self, "answers", tuple(self.answers))
        if not isinstance(self.passages, tuple):
            object.__setattr__(self, "passages", tuple(self.passages))
        if not isinstance(self.candidates, tuple):
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if not isinstance(self.sample_id, str):
            object.__setattr__(self, "sample_id", str(self.sample_id))
        if not isinstance(self.gold_slots, tuple):
            object.__setattr__(self, "gold_slots", tuple(self.gold_slots))
        if isinstance(self.task_info, Mapping):
            object.__setattr__(self, "task_info", canonical_json(self.task_info) if self.task_info else "")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (answers as a list)."""
        d = asdict(self)
        d["answers"] = list(self.answers)
        if self.passages:
            d["passages"] = list(self.passages)
        else:
            # single-passage samples keep the record they always had (so runs made before these fields resume)
            for key in ("passages", "article", "gold_slot"):
                del d[key]
        del d["candidates"]  # the source's distractor pool, not what was evaluated (``passages`` is)
        del d["origin"]
        # Written only when set, so every sample without them keeps the record it always had (resume compares it).
        if self.gold_slots:
            d["gold_slots"] = list(self.gold_slots)
        else:
            del d["gold_slots"]
        if self.task_info:
            d["task_info"] = self.info
        else:
            del d["task_info"]
        return d

    @property
    def info(self) -> dict:
        """``task_info`` as a mapping ({} when unset)."""
        text = self.task_info
        return json.loads(text) if isinstance(text, str) and text else {}

    @property
    def documents(self) -> list[str] | None:
        """The passages as document spans, or None for a single-passage sample (``passage``)."""
        return list(self.passages) or None

    @classmethod
    def from_dict(cls, d) -> Sample:
        """Inverse of `to_dict`; keys that are not fields (e.g. result columns) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})


@dataclass(frozen=True)
class Rejection:
    """A source record a loader could not turn into a usable sample, and why."""

    source_id: str
    reason: str

    def to_dict(self) -> dict:
        return {"source_id": self.source_id, "reason": self.reason}


@dataclass
class LoadResult:
    """What `load_samples` returns: the selection plus an account of what was left out."""

    samples: list[Sample]  # the selected samples, in selection order
    rejected: list[dict] = field(default_factory=list)  # {"source_id", "reason"} per failed record
    n_candidates: int = 0  # records that passed every check (before taking n_samples)


def canonical_json(value) -> str:
    """One spelling per JSON value (sorted keys, no spaces): equal mappings give equal, hashable text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dedupe(texts) -> tuple[str, ...]:
    """Distinct strings in first-seen order (reference answers often repeat verbatim)."""
    return tuple(dict.fromkeys(texts))
