"""Where a condition's surrogate text comes from.

Sources: ``none``; ``query`` (the sample's true query: an oracle); ``random_query`` (another sample's
query, chosen per sample from the run seed); ``random_tokens`` (N token ids drawn per sample from the run
seed, decoded to text, then re-encoded like any text); ``static:<name>`` (a fixed intent question from the
static set); ``generated:<template>`` (written by the model for each document, seeded and stored on disk;
see ``kvprime.surrogates.generation``). Every random draw uses its own ``numpy.random.Generator`` seeded
from (run seed, sample id):
the same sample gets the same surrogate whatever else the run contains (the notebooks seeded numpy and drew
from torch, so their "fixed" prefixes were not fixed).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError

# The walkthrough notebook's five intent queries (same for every document).
STATIC_SURROGATES: dict[str, str] = {
    "definitional": "What is this and what does it mean?",
    "procedural": "How do I do this step by step?",
    "quantitative": "How much does this cost or how long does it take?",
    "factual": "What are the key facts I need to know?",
    "problem": "What problem does this solve?",
}

SOURCES = ("none", "query", "random_query", "random_tokens", "static:<name>", "generated:<template>")


def _rng(seed: int, sample_id: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(sample_id.encode()), zlib.crc32(purpose.encode())])


def validate_source(source: str, static_set: Mapping[str, str]) -> None:
    if source in ("none", "query", "random_query", "random_tokens"):
        return
    kind, _, name = source.partition(":")
    if kind in ("static", "generated"):
        if kind == "static":
            valid, noun = static_set, "static surrogate"
        else:
            from .generation import GENERATION_TEMPLATES

            valid, noun = GENERATION_TEMPLATES, "generation template"
        if name not in valid:
            raise ConfigError(f"surrogate source {source!r} names an unknown {noun} {name!r}. "
                             f"Accepted names: {', '.join(sorted(valid))}.")
        return
    raise ConfigError(f"surrogate source {source!r} is not known. Accepted: {', '.join(SOURCES)}.")


def random_query(sample, pool: Sequence[str], seed: int) -> str:
    """Another sample's query; a sample's own fixed control query wins (the sanity example has one)."""
    if sample.random_query:
        return sample.random_query
    others = sorted({q for q in pool if q != sample.query})
    if not others:
        raise ConfigError(
            "surrogate source random_query needs at least one other sample with a different query; "
            f"the run has only sample {sample.sample_id!r}. Use more samples or another surrogate source."
        )
    return others[int(_rng(seed, sample.sample_id, "random_query").integers(len(others)))]


def random_tokens(sample, tokenizer, n_tokens: int, seed: int) -> str:
    """Text of ``n_tokens`` random ordinary tokens (ids 100 .. vocab-100, as the exp01 notebook drew them)."""
    vocab = len(tokenizer)
    low, high = min(100, vocab // 4), max(vocab - 100, vocab // 2)
    special = set(tokenizer.all_special_ids)
    rng = _rng(seed, sample.sample_id, f"random_tokens:{n_tokens}")
    ids: list[int] = []
    while len(ids) < n_tokens:
        i = int(rng.integers(low, high))
        if i not in special:
            ids.append(i)
    return tokenizer.decode(ids, skip_special_tokens=True)


def resolve(source: str, sample, *, pool: Sequence[str], seed: int, tokenizer=None, n_tokens: int = 20,
            static_set: Mapping[str, str] = STATIC_SURROGATES, generated: Mapping | None = None) -> str | None:
    """The surrogate text for one sample; ``generated`` maps (template, sample_id) to pre-generated text."""
    if source == "none":
        return None
    if source == "query":
        return sample.query
    if source == "random_query":
        return random_query(sample, pool, seed)
    if source == "random_tokens":
        return random_tokens(sample, tokenizer, n_tokens, seed)
    if source.startswith("static:"):
        return static_set[source.split(":", 1)[1]]
    if source.startswith("generated:"):
        key = (source.split(":", 1)[1], sample.sample_id)
        if not generated or key not in generated:
            raise ValueError(f"no generated surrogate for {key}; generate the run's surrogates first")
        return generated[key]
    validate_source(source, static_set)
    raise AssertionError("unreachable")
