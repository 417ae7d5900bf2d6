"""Where a condition's surrogate text comes from.

Sources: ``none``; ``query`` (the sample's true query: an oracle); ``random_query`` (another sample's
query, chosen per sample from the run seed); ``random_tokens`` (N token ids drawn per sample from the run
seed, decoded to text, then re-encoded like any text); ``static:<name>`` (a fixed intent question from the
static set); ``generated:<template>`` (written by the model for each document, seeded and stored on disk;
see ``kvprime.surrogates.generation``); ``generated_other:<template>`` (the generated surrogate of ANOTHER
document of the run: the document-specificity control, see ``derangement``). Every random draw uses its own
``numpy.random.Generator`` seeded from (run seed, sample id):
the same sample gets the same surrogate whatever else the run contains (the notebooks seeded numpy and drew
from torch, so their "fixed" prefixes were not fixed).

``generated_other`` asks whether a generated surrogate helps because it is about *this* document or merely
because it is a well-formed query in the prefix: each sample gets the surrogate (same template, same
generator) of the sample it is mapped to by a seeded derangement of the whole selection. The derangement is a
function of the run seed, the selected sample ids and their documents only: never of the shard, the batch or
the order of the data file, so shards of one run agree and merge.
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

SOURCES = ("none", "query", "random_query", "random_tokens", "static:<name>", "generated:<template>",
           "generated_other:<template>")
# The sources whose text a generation template writes (the part after the colon names the template).
GENERATED_KINDS = ("generated", "generated_other")


def generated_template(source: str) -> str | None:
    """The generation template a source needs (``generated:t`` and ``generated_other:t``), else None."""
    kind, sep, name = source.partition(":")
    return name if sep and kind in GENERATED_KINDS else None


def _rng(seed: int, sample_id: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(sample_id.encode()), zlib.crc32(purpose.encode())])


def validate_source(source: str, static_set: Mapping[str, str]) -> None:
    if source in ("none", "query", "random_query", "random_tokens"):
        return
    kind, _, name = source.partition(":")
    if kind in ("static", *GENERATED_KINDS):
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
            static_set: Mapping[str, str] = STATIC_SURROGATES, generated: Mapping | None = None,
            donors: Mapping[str, str] | None = None) -> str | None:
    """The surrogate text for one sample; ``generated`` maps (template, sample_id) to pre-generated text and
    ``donors`` (``derangement``) sample_id to the sample whose generated text ``generated_other`` takes."""
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
    template = generated_template(source)
    if template is not None:
        donor = sample.sample_id
        if source.startswith("generated_other:"):
            if not donors or sample.sample_id not in donors:
                raise ValueError(f"no donor sample for {sample.sample_id!r}; pass the run's derangement as donors=")
            donor = donors[sample.sample_id]
        key = (template, donor)
        if not generated or key not in generated:
            raise ValueError(f"no generated surrogate for {key}; generate the run's surrogates first")
        return generated[key]
    validate_source(source, static_set)
    raise AssertionError("unreachable")


def derangement(samples: Sequence, seed: int) -> dict[str, str]:
    """sample_id -> donor sample_id for ``generated_other``: no sample is its own donor, and no sample gets a
    donor with an identical document (same passage text) unless the selection makes that unavoidable.

    How: the samples are grouped by document, the groups put in a seeded random order (and each group's
    samples shuffled), and each sample's donor is the one ``m`` places further round that cyclic order, where
    ``m`` is the largest group's size. A group of ``g <= m`` consecutive places cannot reach itself with a
    shift of ``m`` unless ``m > n/2``; then ``2m - n`` samples of the largest group must get one of their own
    document's copies (the fewest possible), and with every document identical the shift is 1. With all
    documents distinct (``m = 1``) it is a uniformly random cyclic order. Depends only on the seed, the sample
    ids and their passages (sorted first: the data file's order does not matter)."""
    by_id = {s.sample_id: s.passage for s in samples}
    ids = sorted(by_id)
    if len(ids) < 2:
        raise ConfigError(f"surrogate source generated_other:<template> gives each sample another sample's generated "
                          f"surrogate, so it needs at least 2 samples; the selection has {len(ids)}. Raise "
                          "dataset.n_samples or drop the generated_other condition.")
    rng = _rng(seed, "", "generated_other")
    groups: dict[str, list[str]] = {}
    for sid in ids:
        groups.setdefault(by_id[sid], []).append(sid)
    ordered = [groups[doc] for doc in sorted(groups)]  # a fixed starting order before the seeded shuffle
    order = [sid for k in rng.permutation(len(ordered)) for sid in rng.permutation(ordered[k]).tolist()]
    n, m = len(order), max(len(g) for g in ordered)
    shift = m if m < n else 1
    return {order[i]: order[(i + shift) % n] for i in range(n)}


def donor_outside(sample, samples: Sequence, seed: int) -> str:
    """A donor for a sample outside the run's selection (``kvprime walkthrough sample=<id>``): one selected
    sample with another document, drawn from (seed, sample id), so the selection's own donors are unchanged."""
    others = sorted(s.sample_id for s in samples if s.sample_id != sample.sample_id and s.passage != sample.passage)
    others = others or sorted(s.sample_id for s in samples if s.sample_id != sample.sample_id)
    if not others:
        raise ConfigError("surrogate source generated_other:<template> needs another sample to take a surrogate "
                          "from; the selection has none. Raise dataset.n_samples.")
    return others[int(_rng(seed, sample.sample_id, "generated_other").integers(len(others)))]
