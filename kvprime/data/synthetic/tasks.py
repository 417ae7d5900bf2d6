"""The three synthetic retrieval tasks, each a dataset loader (``dataset.name``).

- ``synthetic_kv``: key-value retrieval across k documents. Every document holds ``facts_per_document`` facts
  "The access code for the <colour> <object> is <value>." among filler; the question asks one fact's value; its
  document's slot is ``gold_slot``.
- ``synthetic_twohop``: two hops across documents. One document says "The <x> uses the same access code as the
  <y>." and another gives the <y>'s code; the question asks the <x>'s code, which no fact states directly.
  ``gold_slots`` = (the pointer's slot, the code's slot): hop order.
- ``synthetic_niah``: a needle in filler: one long document (a single-passage sample), the needle fact at
  ``depth``.

Every other fact of a sample is a distractor of the same form with its own key and value; ``lures`` of them share
the asked key's object in another colour (for the two-hop task, the key whose code is looked up). The question
ends with an instruction to give the value only (``instruction``), so the answer is exact and short: exact match
is the primary metric (contains beside it; NLL of the value as always). Every sample records its gold answer, its
gold documents and where every fact landed (``Sample.task_info``: per fact the slot, word and character offset,
relative depth and role), for accuracy by slot and by depth.

Determinism: sample ``i`` is drawn from streams named by (dataset.seed, task, i, purpose) (``draws``), so the same
seed and knobs give the same samples and ids on every machine, and ``dataset.n`` more samples extend the list
without changing the first ones. The id carries a digest of the knobs: other knobs, other ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

from kvprime.data import register_loader
from kvprime.data.types import Sample, canonical_json

from ...errors import ConfigError
from . import layout
from .draws import stream
from .options import Knobs, parse
from .text import COLOURS, FACT, OBJECTS, POINTER, QUESTION, WORDS, value

# Knobs every task reads; the multi-document tasks add documents and their slots.
COMMON = ("n", "words_per_document", "facts_per_document", "lures", "value_format", "digits", "depth", "instruction")
# Chosen so that the packaged default model's joint (full-context) accuracy sits inside 40-85%, neither at floor
# nor at ceiling (docs/synthetic.md: the calibration table); conf/dataset/synthetic_*.yaml show the same values.
DEFAULTS: dict[str, dict[str, object]] = {
    "synthetic_kv": {"documents": 3, "words_per_document": 60, "facts_per_document": 1},
    "synthetic_twohop": {"documents": 3, "words_per_document": 60, "facts_per_document": 1, "hop_order": "forward"},
    "synthetic_niah": {"words_per_document": 400, "facts_per_document": 3},
}


def _digest(knobs: Knobs) -> str:
    return hashlib.sha256(canonical_json(knobs.record()).encode()).hexdigest()[:8]


def _keys(knobs: Knobs, i: int, heads: int, others: int) -> tuple[list[str], list[str], list[str]]:
    """(``heads`` asked keys with distinct objects, the lures (the last head's object in other colours), the other
    distractors' keys (objects no head has)), all distinct."""
    draws = stream(knobs.seed, knobs.task, i, "keys")
    objects = draws.shuffled(OBJECTS)
    head_keys = [f"{draws.pick(COLOURS)} {o}" for o in objects[:heads]]
    colour, target = head_keys[-1].split()
    lures = [f"{c} {target}" for c in draws.sample([c for c in COLOURS if c != colour], knobs.lures)]
    pool = [f"{c} {o}" for o in objects[heads:] for c in COLOURS]
    return head_keys, lures, draws.sample(pool, others - len(lures))


def _values(knobs: Knobs, i: int, n: int) -> list[str]:
    """``n`` distinct values."""
    draws = stream(knobs.seed, knobs.task, i, "values")
    if knobs.value_format == "words":
        return draws.sample(WORDS, n)
    out: list[str] = []
    while len(out) < n:
        v = value(draws, "digits", knobs.digits)
        if v not in out:
            out.append(v)
    return out


def _distractors(knobs: Knobs, i: int, lures: list[str], others: list[str], values: list[str]) -> list[layout.Fact]:
    """The distractor facts in a seeded order (the order they are dealt to documents in)."""
    facts = [layout.Fact(FACT.format(key=k, value=v), "lure" if k in lures else "distractor", k, v)
             for k, v in zip(lures + others, values, strict=True)]
    return stream(knobs.seed, knobs.task, i, "deal").shuffled(facts)


def _deal(knobs: Knobs, gold: Mapping[int, list[layout.Fact]], rest: list[layout.Fact]) -> list[list[layout.Fact]]:
    """Each document's facts: its gold facts first, then distractors until it holds ``facts_per_document``."""
    docs, at = [], 0
    for slot in range(knobs.documents):
        own = list(gold.get(slot, []))
        take = knobs.facts_per_document - len(own)
        docs.append(own + rest[at:at + take])
        at += take
    return docs


def _documents(knobs: Knobs, i: int, facts: list[list[layout.Fact]]) -> tuple[list[str], list[dict]]:
    """Each document's text and every fact's position record, by slot."""
    texts, where = [], []
    for slot, own in enumerate(facts):
        text, records = layout.build(own, knobs.words_per_document, stream(knobs.seed, knobs.task, i, "filler", slot),
                                     stream(knobs.seed, knobs.task, i, "place", slot), slot)
        texts.append(text)
        where += records
    return texts, sorted(where, key=lambda r: (r["slot"], r["word"]))


def _question(knobs: Knobs, key: str) -> str:
    return " ".join(p for p in (QUESTION.format(key=key), knobs.instruction) if p)


def _slot(knobs: Knobs, i: int) -> int:
    policy, k = knobs.gold_slot, knobs.documents
    if isinstance(policy, int):
        return policy
    fixed = {"first": 0, "middle": k // 2, "last": k - 1, "cycle": i % k}
    return fixed[policy] if policy in fixed else stream(knobs.seed, knobs.task, i, "slot").index(k)


def _hop_slots(knobs: Knobs, i: int) -> tuple[int, int]:
    a, b = stream(knobs.seed, knobs.task, i, "slot").sample(range(knobs.documents), 2)
    if knobs.hop_order == "forward":
        return min(a, b), max(a, b)
    if knobs.hop_order == "backward":
        return max(a, b), min(a, b)
    return a, b


def _sample(knobs: Knobs, i: int, *, key: str, answer: str, texts: list[str], where: list[dict],
            gold_slots: tuple[int, ...], extra: Mapping) -> Sample:
    info = {"task": knobs.task, "key": key, "facts": where, **extra}
    several = knobs.task != "synthetic_niah"
    return Sample(sample_id=f"{knobs.task}-{_digest(knobs)}-{i:05d}", passage=texts[gold_slots[0]],
                  query=_question(knobs, key), answer=answer, answers=(answer,), source=knobs.task,
                  passages=tuple(texts) if several else (), gold_slot=gold_slots[0] if several else None,
                  gold_slots=gold_slots if several else (), task_info=info)


def kv_sample(knobs: Knobs, i: int) -> Sample:
    """One key-value retrieval sample (also the needle task's, with one document)."""
    total = knobs.documents * knobs.facts_per_document
    (key,), lures, others = _keys(knobs, i, 1, total - 1)
    answer, *rest = _values(knobs, i, total)
    slot = _slot(knobs, i) if knobs.documents > 1 else 0
    role = "needle" if knobs.task == "synthetic_niah" else "gold"
    gold = layout.Fact(FACT.format(key=key, value=answer), role, key, answer, knobs.depth_of(i))
    facts = _deal(knobs, {slot: [gold]}, _distractors(knobs, i, lures, others, rest))
    texts, where = _documents(knobs, i, facts)
    return _sample(knobs, i, key=key, answer=answer, texts=texts, where=where, gold_slots=(slot,),
                   extra={"answer_slot": slot})


def twohop_sample(knobs: Knobs, i: int) -> Sample:
    """One two-hop sample: the asked key points to another key, whose code is the answer."""
    total = knobs.documents * knobs.facts_per_document
    (key, target), lures, others = _keys(knobs, i, 2, total - 2)
    answer, *rest = _values(knobs, i, total - 1)
    first, second = _hop_slots(knobs, i)
    depth = knobs.depth_of(i)
    hop1 = layout.Fact(POINTER.format(key=key, target=target), "hop1", key, target, depth)
    hop2 = layout.Fact(FACT.format(key=target, value=answer), "hop2", target, answer, depth)
    facts = _deal(knobs, {first: [hop1], second: [hop2]}, _distractors(knobs, i, lures, others, rest))
    texts, where = _documents(knobs, i, facts)
    order = "forward" if first < second else "backward"
    return _sample(knobs, i, key=key, answer=answer, texts=texts, where=where, gold_slots=(first, second),
                   extra={"answer_slot": second, "hops": [first, second], "hop_order": order, "bridge": target})


def _samples(cfg: Mapping, task: str, make, **rules) -> Iterator[Sample]:
    if cfg.get("group_by_passage"):
        raise ConfigError(f"dataset.group_by_passage=true serves one passage's cache to all of its questions, but "
                          f"{task} generates one question per context, so no two samples share a passage. Set "
                          "dataset.group_by_passage=false.")
    knobs = parse(cfg, task, DEFAULTS[task], **rules)
    for i in range(knobs.n):
        yield make(knobs, i)


@register_loader("synthetic_kv", options=(*COMMON, "documents", "gold_slot"))
def load_kv(cfg: Mapping) -> Iterator[Sample]:
    """Key-value retrieval across ``documents`` documents (module docstring; knobs: conf/dataset/synthetic_kv.yaml)."""
    return _samples(cfg, "synthetic_kv", kv_sample)


@register_loader("synthetic_twohop", options=(*COMMON, "documents", "hop_order"))
def load_twohop(cfg: Mapping) -> Iterator[Sample]:
    """Two hops across documents (module docstring; knobs: conf/dataset/synthetic_twohop.yaml)."""
    return _samples(cfg, "synthetic_twohop", twohop_sample, min_documents=2, gold_facts=2)


@register_loader("synthetic_niah", options=COMMON)
def load_niah(cfg: Mapping) -> Iterator[Sample]:
    """A needle in one long document (module docstring; knobs: conf/dataset/synthetic_niah.yaml)."""
    return _samples(cfg, "synthetic_niah", kv_sample)
