"""Multi-document samples: the gold passage among k-1 distractors, in a recorded slot (``multidoc.*``).

Distractor sources:

- ``random``: passages of other samples of the dataset (every usable candidate's passage, not only the
  selection's), drawn per sample;
- ``same_article``: the other paragraphs of the gold passage's article (SQuAD: topical hard negatives);
- ``nearest``: the passages most similar to the query by all-MiniLM-L6-v2 cosine (retrieval-like; the gold
  passage excluded), most similar first;
- ``candidates``: the query's own candidate passages (MS MARCO v1.1 ``passages.passage_text``; the gold is the
  one ``is_selected`` marks in mode walkthrough, the first in mode exp21), drawn per sample.

The gold passage goes to slot ``first``, ``middle`` (k // 2), ``last`` or ``random``; ``Sample.gold_slot``
records it. Every draw uses its own generator seeded from (dataset.seed, sample id, purpose), so a sample's
context depends neither on the selection, the shard nor the file order. Eligibility (enough distinct
distractors) is decided before selection, so ``dataset.n_samples`` is honoured; an ineligible candidate is
rejected with its reason.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from ..config.settings import DISTRACTOR_SOURCES as SOURCES
from ..config.settings import GOLD_SLOTS as SLOTS  # noqa: F401 - the accepted words, declared with the settings
from ..errors import ConfigError
from ..models.embedder import Embedder
from .types import Rejection, Sample


def _rng(seed: int, sample_id: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(sample_id.encode()), zlib.crc32(purpose.encode())])


def gold_slot(k: int, policy: str, sample_id: str, seed: int) -> int:
    if policy == "first":
        return 0
    if policy == "last":
        return k - 1
    if policy == "middle":
        return k // 2
    return int(_rng(seed, sample_id, "gold_slot").integers(k))


class Pool:
    """The distinct passages distractors may come from, sorted (the file's order does not matter)."""

    def __init__(self, candidates: Sequence[Sample]):
        self.passages = sorted({s.passage for s in candidates})
        groups: dict[str, set[str]] = {}
        for s in candidates:
            if s.article:
                groups.setdefault(s.article, set()).add(s.passage)
        self.by_article = {a: sorted(p) for a, p in groups.items()}

    def others(self, sample: Sample, source: str) -> list[str]:
        """The distractors ``sample`` may get from ``source`` (not ``nearest``: that is a ranking)."""
        if source == "same_article":
            return [p for p in self.by_article.get(sample.article, ()) if p != sample.passage]
        if source == "candidates":
            return sorted({p for p in sample.candidates if p.strip() and p != sample.passage})
        return [p for p in self.passages if p != sample.passage]


def _why_not(sample: Sample, pool: Pool, k: int, source: str) -> str | None:
    if source in ("random", "nearest"):
        return None  # checked once for the whole pool
    n = len(pool.others(sample, source))
    if n >= k - 1:
        return None
    where = f"article {sample.article!r}" if source == "same_article" else "the query's candidate passages"
    return f"multidoc.k={k} needs {k - 1} distractors from {source}; {where} offer {n}"


def eligible(candidates: list[Sample], settings: Mapping) -> tuple[list[Sample], list[dict], Pool | None]:
    """The candidates that can get ``k - 1`` distractors, the rejections of the rest, and the pool."""
    k, source = settings["k"], settings["distractors"]
    if k == 1:
        return candidates, [], None
    given = next((s for s in candidates if s.passages), None)
    if given is not None:
        raise ConfigError(f"multidoc.k={k}, but the data already gives sample {given.sample_id!r} several passages; "
                          "multidoc builds the context from single-passage samples. Accepted: multidoc.k=1 "
                          "for data with its own passages.")
    pool = Pool(candidates)
    if source in ("random", "nearest") and len(pool.passages) < k:
        raise ConfigError(f"multidoc.k={k} with multidoc.distractors={source} needs at least {k} distinct passages "
                          f"in the dataset; it has {len(pool.passages)}. Lower multidoc.k or use more data.")
    if source == "same_article" and not pool.by_article:
        raise ConfigError("multidoc.distractors=same_article needs a source that groups passages into articles "
                          "(squad_v11, or jsonl with an 'article' field); this dataset's samples have none. "
                          f"Accepted: {', '.join(SOURCES)}.")
    kept, rejected = [], []
    for s in candidates:
        reason = _why_not(s, pool, k, source)
        if reason is None:
            kept.append(s)
        else:
            rejected.append(Rejection(s.sample_id, reason).to_dict())
    return kept, rejected, pool


def _nearest(samples: Sequence[Sample], pool: Pool, n: int) -> dict[str, list[str]]:
    """sample_id -> the ``n`` pool passages most similar to its query (gold excluded), most similar first."""
    # lazy: sentence_transformers (and torch): only multidoc's nearest distractors need them
    import torch
    from sentence_transformers import util

    embedder = Embedder()
    corpus = torch.as_tensor(embedder.embed(pool.passages), dtype=torch.float32)
    queries = torch.as_tensor(embedder.embed([s.query for s in samples]), dtype=torch.float32)
    # One more than needed: the gold passage is usually among the nearest.
    hits = util.semantic_search(queries, corpus, top_k=n + 1, score_function=util.dot_score)
    out = {}
    for s, row in zip(samples, hits, strict=True):
        ranked = [pool.passages[int(h["corpus_id"])] for h in row]
        out[s.sample_id] = [p for p in ranked if p != s.passage][:n]
    return out


def attach(selected: list[Sample], pool: Pool, settings: Mapping) -> list[Sample]:
    """The selected samples with their k passages (gold at its slot) and ``gold_slot``; k=1: unchanged."""
    k, source, policy, seed = settings["k"], settings["distractors"], settings["gold_slot"], settings["seed"]
    if k == 1 or not selected:
        return selected
    ranked = _nearest(selected, pool, k - 1) if source == "nearest" else {}
    out = []
    for s in selected:
        if source == "nearest":
            chosen = ranked[s.sample_id]
        else:
            others = pool.others(s, source)
            idx = _rng(seed, s.sample_id, f"distractors:{source}").choice(len(others), size=k - 1, replace=False)
            chosen = [others[int(i)] for i in idx]
        slot = gold_slot(k, policy, s.sample_id, seed)
        passages = chosen[:slot] + [s.passage] + chosen[slot:]
        out.append(replace(s, passages=tuple(passages), gold_slot=slot))
    return out
