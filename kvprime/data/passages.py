"""Questions grouped by passage (``dataset.group_by_passage``): one primed cache serves every question of its
passage, as a deployed cache would.

A passage is identified by its text (``passage_id``), so any loader's samples group without a loader option:
SQuAD's questions of one paragraph share its ``context``. Grouped selection takes whole passages, keeps each
passage's questions consecutive and drops passages with a single usable question (counted among the rejected
records): ``sibling_query`` needs a second question, and a cluster of one says nothing about reuse.
The scoring chunks (and so the shards) are whole passages (``chunks``): the engine memoises identical encodes
within a chunk, so a passage's query-independent caches (bare, static, generated, sibling) are encoded once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from .types import Rejection

MIN_QUESTIONS = 2


def passage_key(text: str) -> str:
    """A short stable id of a passage text (the same text, the same id, in every run and shard)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def passage_id(sample) -> str:
    """The id of the sample's passage (``passage_key`` of its text)."""
    return passage_key(sample.passage)


def groups(samples: Sequence) -> list[list]:
    """The samples grouped by passage, groups in order of first appearance, questions in their order."""
    out: dict[str, list] = {}
    for s in samples:
        out.setdefault(passage_id(s), []).append(s)
    return list(out.values())


def select_grouped(candidates: Sequence, n: int | None, selection: str, seed) -> tuple[list, list[dict]]:
    """Whole passages, in source order: with ``n``, passages are taken (``first``: in source order; ``random``:
    in a seeded order) until they hold at least ``n`` questions, so the last one taken may bring up to its size
    minus one more. Returns the samples and the rejections of passages with fewer than ``MIN_QUESTIONS``."""
    found = groups(candidates)
    kept = [g for g in found if len(g) >= MIN_QUESTIONS]
    rejected = [Rejection(s.sample_id, f"the only usable question of its passage (dataset.group_by_passage needs "
                                       f">= {MIN_QUESTIONS})").to_dict() for g in found if len(g) < MIN_QUESTIONS
                for s in g]
    if n is not None:
        order = range(len(kept)) if selection == "first" else np.random.default_rng(seed).permutation(len(kept))
        taken, total = [], 0
        for k in order:
            if total >= n:
                break
            taken.append(int(k))
            total += len(kept[k])
        kept = [kept[k] for k in sorted(taken)]  # source order: same seed, same samples, readable run order
    return [s for g in kept for s in g], rejected


def chunks(items: Sequence, key=passage_id) -> list[list]:
    """Scoring chunks of grouped samples: one passage each (its questions are consecutive in the selection).
    ``key``: the passage of an item (``kvprime merge`` splits inputs.jsonl rows)."""
    out: list[list] = []
    for item in items:
        if out and key(out[-1][0]) == key(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out
