"""Where a condition's surrogate text comes from: the surrogate-source registry and kvprime's own sources.

A source is registered by name with ``@register_source(name, ...)`` (as builders with ``register_builder`` and
loaders with ``register_loader``); a condition names it in ``surrogate:``. A researcher's source is one module
named in the run's ``plugins:`` list; each module of this package registers its own (``sibling_query``). A
source declares:

- its resolver ``fn(sample, ctx, arg) -> str | None``: the text for one sample (``ctx``: ``SourceContext``, what
  the run knows; ``arg``: the part after the colon of ``name:<arg>``, None for a source without one);
- ``arg`` (e.g. ``"<name>"``) if it takes one, and ``accepted(static_set) -> names`` to check it;
- ``prepare(selection, seed) -> state``, if it needs the whole selection (a donor, a sibling): computed once per
  run over the whole selection, never the shard, so every shard and command agrees; it raises ``ConfigError``
  before any model loads when the selection cannot serve the source.

Sources: ``none``; ``query`` (the sample's true query: an oracle); ``random_query`` (another sample's
query, chosen per sample from the run seed); ``random_tokens`` (N token ids drawn per sample from the run
seed, decoded to text, then re-encoded like any text); ``static:<name>`` (a fixed intent question from the
static set); ``generated:<template>`` (written by the model for each document, seeded and stored on disk;
see ``kvprime.surrogates.generation``); ``generated_other:<template>`` (the generated surrogate of ANOTHER
document of the run: the document-specificity control, see ``derangement``); ``sibling_query`` (another real
question about the same passage). Every random draw uses its own ``numpy.random.Generator`` seeded from
(run seed, sample id):
the same sample gets the same surrogate whatever else the run contains (the notebooks seeded numpy and drew
from torch, so their "fixed" prefixes were not fixed).

``generated_other`` asks whether a generated surrogate helps because it is about *this* document or merely
because it is a well-formed query in the prefix: each sample gets the surrogate (same template, same
generator) of the sample it is mapped to by a seeded derangement of the whole selection. The derangement is a
function of the run seed, the selected sample ids and their documents only: never of the shard, the batch or
the order of the data file, so shards of one run agree and merge.
"""

from __future__ import annotations

import importlib
import pkgutil
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ...data.passages import passage_id
from ...errors import ConfigError

# The walkthrough notebook's five intent queries (same for every document).
STATIC_SURROGATES: dict[str, str] = {
    "definitional": "What is this and what does it mean?",
    "procedural": "How do I do this step by step?",
    "quantitative": "How much does this cost or how long does it take?",
    "factual": "What are the key facts I need to know?",
    "problem": "What problem does this solve?",
}


@dataclass(frozen=True)
class SourceContext:
    """What a resolver may use besides the sample. ``selection``: the whole selection (not the shard);
    ``state``: what the source's ``prepare`` computed from it."""

    pool: Sequence[str] = ()
    seed: int = 0
    tokenizer: object = None
    n_tokens: int = 20
    static_set: Mapping[str, str] = field(default_factory=lambda: STATIC_SURROGATES)
    generated: Mapping | None = None
    donors: Mapping[str, str] | None = None
    selection: Sequence | None = None
    state: object = None
    exclude: Collection[str] = ()  # queries random_query must not draw (the passage's own, in a grouped run)


@dataclass(frozen=True)
class SourceInfo:
    name: str
    resolve: Callable
    arg: str | None = None  # "<name>": the source is spelled name:<arg>; None: it takes no argument
    accepted: Callable[[Mapping[str, str]], Mapping] | None = None  # (static_set) -> the arguments it accepts
    noun: str = "name"  # what the argument is, for the error paragraph
    template: bool = False  # the argument names a generation template (the run generates surrogates for it)
    prepare: Callable | None = None  # (selection, seed) -> state, once per run over the whole selection
    doc: str = ""

    @property
    def spelling(self) -> str:
        return f"{self.name}:{self.arg}" if self.arg else self.name


SOURCE_REGISTRY: dict[str, SourceInfo] = {}


def register_source(name: str, *, arg: str | None = None, accepted: Callable | None = None, noun: str = "name",
                    template: bool = False, prepare: Callable | None = None):
    """Decorator: make ``fn(sample, ctx, arg) -> str | None`` available as ``surrogate: <name>`` (or
    ``<name>:<arg>`` when ``arg`` is given)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ConfigError(f"a surrogate source needs a name without ':', got {name!r}.")

    def wrap(fn):
        old = SOURCE_REGISTRY.get(name)
        if old is not None and (old.resolve.__module__, old.resolve.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ConfigError(f"surrogate source {name!r} is registered twice ({old.resolve.__module__} and "
                              f"{fn.__module__}).")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if (fn.__doc__ or "").strip() else ""
        SOURCE_REGISTRY[name] = SourceInfo(name, fn, arg, accepted, noun, template, prepare, doc)
        return fn
    return wrap


def spellings() -> tuple[str, ...]:
    """Every registered source as a condition spells it, in registration order."""
    return tuple(info.spelling for info in SOURCE_REGISTRY.values())


def lookup(source: str) -> tuple[SourceInfo, str | None]:
    """The registered source and its argument for a condition's ``surrogate:`` value, or ConfigError."""
    kind, sep, arg = source.partition(":") if isinstance(source, str) else ("", "", "")
    info = SOURCE_REGISTRY.get(kind)
    if info is None or bool(sep) != bool(info.arg):
        raise ConfigError(f"surrogate source {source!r} is not known. Accepted: {', '.join(spellings())}.")
    return info, (arg if sep else None)


def generated_template(source: str) -> str | None:
    """The generation template a source needs (``generated:t`` and ``generated_other:t``), else None."""
    kind, sep, name = source.partition(":")
    info = SOURCE_REGISTRY.get(kind)
    return name if sep and info is not None and info.template else None


def _rng(seed: int, sample_id: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(sample_id.encode()), zlib.crc32(purpose.encode())])


def validate_source(source: str, static_set: Mapping[str, str]) -> None:
    info, arg = lookup(source)
    if info.accepted is not None:
        valid = info.accepted(static_set)
        if arg not in valid:
            raise ConfigError(f"surrogate source {source!r} names an unknown {info.noun} {arg!r}. "
                              f"Accepted names: {', '.join(sorted(valid))}.")


def prepare(source: str, selection: Sequence, seed: int):
    """The source's per-run state over the whole selection (None for a source that needs none); raises
    ConfigError when the selection cannot serve the source (said before any model loads)."""
    info, _ = lookup(source)
    return info.prepare(selection, seed) if info.prepare is not None else None


def resolve(source: str, sample, *, pool: Sequence[str], seed: int, tokenizer=None, n_tokens: int = 20,
            static_set: Mapping[str, str] = STATIC_SURROGATES, generated: Mapping | None = None,
            donors: Mapping[str, str] | None = None, selection: Sequence | None = None, state=None,
            exclude: Collection[str] = ()) -> str | None:
    """The surrogate text for one sample; ``generated`` maps (template, sample_id) to pre-generated text and
    ``donors`` (``derangement``) sample_id to the sample whose generated text ``generated_other`` takes.
    A source with ``prepare`` takes its ``state``, or computes it from ``selection``."""
    validate_source(source, static_set)
    info, arg = lookup(source)
    if info.prepare is not None and state is None:
        if selection is None:
            raise ValueError(f"surrogate source {source!r} needs the run's selection (selection=) or its state")
        state = info.prepare(selection, seed)
    ctx = SourceContext(pool=pool, seed=seed, tokenizer=tokenizer, n_tokens=n_tokens, static_set=static_set,
                        generated=generated, donors=donors, selection=selection, state=state, exclude=exclude)
    return info.resolve(sample, ctx, arg)


# ------------------------------------------------------------ kvprime's own sources


@register_source("none")
def _none(sample, ctx, arg) -> None:
    """No surrogate."""
    return None


@register_source("query")
def _query(sample, ctx, arg) -> str:
    """The sample's true query (an oracle)."""
    return sample.query


@register_source("random_query")
def _random_query(sample, ctx, arg) -> str:
    """Another sample's query, drawn per sample from the run seed."""
    return random_query(sample, ctx.pool, ctx.seed, exclude=ctx.exclude)


@register_source("random_tokens")
def _random_tokens(sample, ctx, arg) -> str:
    """N random ordinary tokens, drawn per sample from the run seed."""
    return random_tokens(sample, ctx.tokenizer, ctx.n_tokens, ctx.seed)


@register_source("static", arg="<name>", accepted=lambda static_set: static_set, noun="static surrogate")
def _static(sample, ctx, arg) -> str:
    """A fixed intent question from the static set."""
    return ctx.static_set[arg]


def _templates(static_set):
    from ..generation import GENERATION_TEMPLATES  # lazy: torch; `kvprime conditions` lists sources without it

    return GENERATION_TEMPLATES


def _generated_text(template: str, donor: str, generated) -> str:
    key = (template, donor)
    if not generated or key not in generated:
        raise ValueError(f"no generated surrogate for {key}; generate the run's surrogates first")
    return generated[key]


@register_source("generated", arg="<template>", accepted=_templates, noun="generation template", template=True)
def _generated(sample, ctx, arg) -> str:
    """Written by the generator for this document (seeded, stored)."""
    return _generated_text(arg, sample.sample_id, ctx.generated)


@register_source("generated_other", arg="<template>", accepted=_templates, noun="generation template",
                 template=True, prepare=lambda selection, seed: derangement(selection, seed))
def _generated_other(sample, ctx, arg) -> str:
    """The generated surrogate of another document of the run (a seeded derangement)."""
    if not ctx.donors or sample.sample_id not in ctx.donors:
        raise ValueError(f"no donor sample for {sample.sample_id!r}; pass the run's derangement as donors=")
    return _generated_text(arg, ctx.donors[sample.sample_id], ctx.generated)


def random_query(sample, pool: Sequence[str], seed: int, exclude: Collection[str] = ()) -> str:
    """Another sample's query; a sample's own fixed control query wins (the sanity example has one).
    ``exclude``: queries never drawn. A grouped run passes the passage's own questions, so the random control
    is never a sibling question (which would make it the sibling_query condition)."""
    if sample.random_query:
        return sample.random_query
    others = sorted({q for q in pool if q != sample.query and q not in exclude})
    if not others:
        where = ("the questions of other passages (a passage's own questions are never its control)" if exclude
                 else "the other samples' queries")
        raise ConfigError(
            f"surrogate source random_query draws sample {sample.sample_id!r}'s random control from {where}, "
            "and the selection has none. Use more samples or another surrogate source."
        )
    return others[int(_rng(seed, sample.sample_id, "random_query").integers(len(others)))]


def random_query_unserved(selection: Sequence, *, by_passage: bool) -> list:
    """The selected samples ``random_query`` has no control for: no fixed control query of their own, and no
    query in the selection but their own (``by_passage``: but their passage's questions, which are excluded).
    Linear in the selection: what a sample excludes is part of the pool, so the pool has more iff it is larger."""
    pool = {s.query for s in selection}
    if by_passage:
        own: dict[str, set] = {}
        for s in selection:
            own.setdefault(passage_id(s), set()).add(s.query)
        return [s for s in selection if not s.random_query and len(own[passage_id(s)]) >= len(pool)]
    return [s for s in selection if not s.random_query and len(pool) < 2]


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




def _discover() -> None:
    """Import every module of this package: each registers its source (no list to keep by hand)."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_discover()

# kvprime's own sources as conditions spell them (a plugin's are in ``spellings()`` once it is loaded).
SOURCES = spellings()
