"""Where a condition's surrogate text comes from: the surrogate-source registry and kvprime's simple sources.

A source is registered by name with ``@register_source(name, ...)`` (as builders with ``register_builder`` and
loaders with ``register_loader``; all on ``kvprime.registry.Registry``); a condition names it in ``surrogate:``.
A researcher's source is one module named in the run's ``plugins:`` list; each module of this package registers
its own (``generated``, ``sibling_query``), found by package discovery. A source declares:

- its resolver ``fn(sample, ctx, arg) -> str | None``: the text for one sample. ``arg`` is the part after the
  colon of ``name:<arg>`` (None for a source without one); ``ctx`` holds exactly what ``needs`` declares, read as
  attributes (``ctx.pool``); reading anything else is refused with a paragraph naming the declaration to add;
- ``arg`` (e.g. ``"<name>"``) if it takes one, and ``accepted(static_set) -> names`` to check it;
- ``needs``: what it reads from ``ctx``, from ``NEEDS``: the run seed, the random-query pool and what a sample
  must not draw from it, the tokenizer, the condition's token budget, the static set, the whole selection, its
  prepared state, the sample's siblings (the selected questions about its passage), a donor (another selected
  sample) and ``generated``: the text the generator wrote for a document, with the template its argument names.
  A source needing ``generated`` generates: the run writes (through the store) what it needs before resolving;
- ``document`` (a generating source): whose document the text is generated for, ``"own"`` (the sample's) or
  ``"donor"`` (its donor's);
- ``per_document`` (a generating source of its own document): with a builder that primes each document on its own
  (``surrogate_per_document``), each passage of a multi-passage sample gets its own text: the resolver is called
  once per passage with that passage's generated text;
- ``prepare(selection, seed) -> state``, if it needs the whole selection: computed once per run over the whole
  selection, never the shard, so every shard and command agrees; it raises ``ConfigError`` before any model loads
  when the selection cannot serve the source. ``prepare_all`` does it for a run's sources, with the donors.

Sources: ``none``; ``query`` (the sample's true query: an oracle); ``random_query`` (another sample's
query, chosen per sample from the run seed); ``random_tokens`` (N token ids drawn per sample from the run
seed, decoded to text, then re-encoded like any text); ``static:<name>`` (a fixed intent question from the
static set); ``generated:<template>`` and ``generated_other:<template>`` (``generated.py``); ``sibling_query``
(``sibling_query.py``). Every random draw uses its own ``numpy.random.Generator`` seeded from (run seed, sample
id): the same sample gets the same surrogate whatever else the run contains (the notebooks seeded numpy and drew
from torch, so their "fixed" prefixes were not fixed).

Donors (``derangement``): a source with ``document="donor"`` or needing ``donor`` gets, for each sample, the
sample it is mapped to by a seeded derangement of the whole selection, one for the run whichever sources use it. It
is a function of the run seed, the selected sample ids and their documents only: never of the shard, the batch or
the order of the data file, so shards of one run agree and merge.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from ...data.passages import passage_id
from ...errors import ConfigError
from ...registry import Registry

# The walkthrough notebook's five intent queries (same for every document).
STATIC_SURROGATES: dict[str, str] = {
    "definitional": "What is this and what does it mean?",
    "procedural": "How do I do this step by step?",
    "quantitative": "How much does this cost or how long does it take?",
    "factual": "What are the key facts I need to know?",
    "problem": "What problem does this solve?",
}

# What a source may declare in ``needs`` (and then read as ``ctx.<name>``).
NEEDS: Mapping[str, str] = MappingProxyType({
    "seed": "the run seed",
    "pool": "the random-query pool: every selected sample's query (the whole selection, not the shard)",
    "exclude": "the queries the sample must not draw from the pool (in a run grouped by passage: its passage's own)",
    "tokenizer": "the scored model's tokenizer (read without the model's weights)",
    "n_tokens": "the condition's token budget (its random_tokens setting)",
    "static_set": "the static intent questions, by name",
    "selection": "every selected sample (the whole selection, not the shard)",
    "state": "what the source's prepare(selection, seed) computed",
    "siblings": "the other selected samples about the sample's passage",
    "donor": "the sample's donor: another selected sample, from the run's seeded derangement of the selection",
    "generated": "the generator's text for a document (document=: the sample's own or its donor's), with the "
                 "template the source's argument names",
})
DOCUMENTS = ("own", "donor")


@dataclass(frozen=True)
class SourceInfo:
    name: str
    resolve: Callable
    arg: str | None = None  # "<name>": the source is spelled name:<arg>; None: it takes no argument
    accepted: Callable[[Mapping[str, str]], Mapping] | None = None  # (static_set) -> the arguments it accepts
    noun: str = "name"  # what the argument is, for the error paragraph
    needs: tuple[str, ...] = ()  # what its resolver reads from ctx (NEEDS)
    document: str = "own"  # whose document a generating source's text is written for: "own" or "donor"
    per_document: bool = False  # each passage of a multi-passage sample gets its own generated text
    prepare: Callable | None = None  # (selection, seed) -> state, once per run over the whole selection
    doc: str = ""

    @property
    def spelling(self) -> str:
        return f"{self.name}:{self.arg}" if self.arg else self.name

    @property
    def generates(self) -> bool:
        """Whether the run's generator writes this source's text (its argument names the template)."""
        return "generated" in self.needs

    @property
    def takes_donor(self) -> bool:
        """Whether it reads another sample of the selection: its donor's generated text, or the donor itself."""
        return self.document == "donor" or "donor" in self.needs


SOURCE_REGISTRY: Registry[SourceInfo] = Registry(
    "surrogate source", packages=(__name__,),
    hint="A source is a function registered with @register_source(name) (kvprime.surrogates.sources) in a module "
         "named in plugins: [...].")


def generation_templates(static_set) -> Mapping[str, str]:
    """The generation templates a generating source's argument may name (its default ``accepted``)."""
    from ..generation import GENERATION_TEMPLATES  # lazy: torch; `kvprime conditions` lists sources without it

    return GENERATION_TEMPLATES


def register_source(name: str, *, arg: str | None = None, accepted: Callable | None = None, noun: str = "name",
                    needs: Iterable[str] = (), document: str = "own", per_document: bool = False,
                    prepare: Callable | None = None):
    """Decorator: make ``fn(sample, ctx, arg) -> str | None`` available as ``surrogate: <name>`` (or
    ``<name>:<arg>`` when ``arg`` is given); the declarations are the module docstring's."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ConfigError(f"a surrogate source needs a name without ':', got {name!r}.")
    needs = tuple(dict.fromkeys(needs))
    _check_declaration(name, arg, needs, document, per_document)
    if "generated" in needs and accepted is None:
        accepted, noun = generation_templates, "generation template"

    def wrap(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if (fn.__doc__ or "").strip() else ""
        info = SourceInfo(name, fn, arg, accepted, noun, needs, document, per_document, prepare, doc)
        SOURCE_REGISTRY.register(name, info, origin=fn)
        return fn
    return wrap


def _check_declaration(name: str, arg, needs: tuple, document: str, per_document: bool) -> None:
    where = f"surrogate source {name!r}"
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ConfigError(f"{where} declares needs={list(needs)}, but {', '.join(map(repr, unknown))} is not "
                          f"something a source can be given. Accepted: {', '.join(NEEDS)}.")
    if document not in DOCUMENTS:
        raise ConfigError(f"{where}: document={document!r} is not known. Accepted: own (the sample's document), "
                          "donor (its donor's).")
    generates = "generated" in needs
    if generates and not arg:
        raise ConfigError(f"{where} needs 'generated', whose template its argument names, but takes no argument: "
                          "register it with arg=\"<template>\".")
    if document == "donor" and not generates:
        raise ConfigError(f"{where}: document='donor' says whose document its generated text is written for, but "
                          "it does not need 'generated'. A source that reads another sample needs 'donor'.")
    if per_document and (not generates or document != "own"):
        raise ConfigError(f"{where}: per_document=True gives each passage its own generated text, so it needs "
                          "'generated' of its own document (document='own').")


def spellings() -> tuple[str, ...]:
    """Every registered source as a condition spells it, in registration order."""
    return tuple(info.spelling for _, info in SOURCE_REGISTRY.items())


def find(source: str) -> tuple[SourceInfo, str | None] | None:
    """The registered source and its argument for a condition's ``surrogate:`` value, or None."""
    kind, sep, arg = source.partition(":") if isinstance(source, str) else ("", "", "")
    info = SOURCE_REGISTRY.get(kind) if kind in SOURCE_REGISTRY else None
    if info is None or bool(sep) != bool(info.arg):
        return None
    return info, (arg if sep else None)


def lookup(source: str) -> tuple[SourceInfo, str | None]:
    """The registered source and its argument for a condition's ``surrogate:`` value, or ConfigError."""
    found = find(source)
    if found is None:
        raise ConfigError(f"surrogate source {source!r} is not known. Accepted: {', '.join(spellings())}.")
    return found


def generated_template(source: str) -> str | None:
    """The generation template a generating source names (``generated:t``, ``generated_other:t``), else None."""
    found = find(source)
    return found[1] if found is not None and found[0].generates else None


def _rng(seed: int, sample_id: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(sample_id.encode()), zlib.crc32(purpose.encode())])


def validate_source(source: str, static_set: Mapping[str, str]) -> None:
    info, arg = lookup(source)
    if info.accepted is not None:
        valid = info.accepted(static_set)
        if arg not in valid:
            raise ConfigError(f"surrogate source {source!r} names an unknown {info.noun} {arg!r}. "
                              f"Accepted names: {', '.join(sorted(valid))}.")


# ------------------------------------------------------------ what a resolver is given


class SourceInputs:
    """A resolver's ``ctx``: the values its source declared in ``needs``, and nothing else."""

    __slots__ = ("_source", "_values")

    def __init__(self, source: str, values: Mapping):
        self._source = source
        self._values = dict(values)

    def __getattr__(self, name: str):
        values = self._values
        if name in values:
            return values[name]
        if name.startswith("__"):
            raise AttributeError(name)
        declared = [n for n in NEEDS if n in values]
        what = (f"declare it: register_source(..., needs=({', '.join(map(repr, [*declared, name]))},))"
                if name in NEEDS else f"a source can be given: {', '.join(NEEDS)}")
        raise ConfigError(f"surrogate source {self._source!r} reads ctx.{name}, which its registration does not "
                          f"declare (needs={declared}); {what}.")


def call(source: str, sample, values: Mapping) -> str | None:
    """The source's text for ``sample``, its resolver given ``values`` (one per declared need)."""
    info, arg = lookup(source)
    return info.resolve(sample, SourceInputs(source, values), arg)


def resolve(source: str, sample, *, static_set: Mapping[str, str] = STATIC_SURROGATES, **given) -> str | None:
    """The surrogate text for one sample outside a run (a notebook, a test): ``given`` holds the needs by name
    (``pool=``, ``seed=``, ``selection=``, ...). A need not given is derived where it can be: ``state`` and
    ``siblings`` from ``selection``, ``exclude`` empty, ``n_tokens`` 20; a run resolves through
    ``kvprime.surrogates.service.SurrogateService``."""
    validate_source(source, static_set)
    info, _ = lookup(source)
    values = {}
    for need in info.needs:
        if need in given:
            values[need] = given[need]
        elif need == "static_set":
            values[need] = static_set
        elif need in ("state", "siblings") and given.get("selection") is not None:
            selection = given["selection"]
            values[need] = (info.prepare(selection, given.get("seed", 0)) if need == "state" and info.prepare
                            else None if need == "state" else siblings_in(sample, selection))
        elif need in ("exclude", "n_tokens"):
            values[need] = () if need == "exclude" else 20
        else:
            raise ValueError(f"surrogate source {source!r} needs {need!r} ({NEEDS[need]}); pass {need}=")
    return call(source, sample, values)


def siblings_in(sample, selection: Sequence) -> list:
    """The samples of ``selection`` about ``sample``'s passage, ``sample`` itself left out."""
    pid = passage_id(sample)
    return [s for s in selection if s.sample_id != sample.sample_id and passage_id(s) == pid]


# ------------------------------------------------------------ a run's prepared sources


@dataclass(frozen=True)
class PreparedSources:
    """What a run's sources computed over the whole selection, once (``prepare_all``): each source's state (by its
    spelling in the conditions) and the donors (sample_id -> donor sample_id; None when no source takes one)."""

    states: Mapping[str, object]
    donors: Mapping[str, str] | None = None


def prepare(source: str, selection: Sequence, seed: int):
    """The source's per-run state over the whole selection (None for a source that needs none); raises
    ConfigError when the selection cannot serve the source (said before any model loads)."""
    info, _ = lookup(source)
    return info.prepare(selection, seed) if info.prepare is not None else None


def prepare_all(source_names: Iterable[str], selection: Sequence, seed: int) -> PreparedSources:
    """Every source's state and the run's donors, in the conditions' order, each computed once; the first source
    the selection cannot serve raises ConfigError."""
    states, donors = {}, None
    for source in dict.fromkeys(source_names):
        info, _ = lookup(source)
        if info.takes_donor and donors is None:
            donors = derangement(selection, seed, needed_by=info)
        states[source] = prepare(source, selection, seed)
    return PreparedSources(MappingProxyType(states), None if donors is None else MappingProxyType(donors))


# ------------------------------------------------------------ kvprime's simple sources


@register_source("none")
def _none(sample, ctx, arg) -> None:
    """No surrogate."""
    return None


@register_source("query")
def _query(sample, ctx, arg) -> str:
    """The sample's true query (an oracle)."""
    return sample.query


@register_source("random_query", needs=("pool", "exclude", "seed"))
def _random_query(sample, ctx, arg) -> str:
    """Another sample's query, drawn per sample from the run seed."""
    return random_query(sample, ctx.pool, ctx.seed, exclude=ctx.exclude)


@register_source("random_tokens", needs=("tokenizer", "n_tokens", "seed"))
def _random_tokens(sample, ctx, arg) -> str:
    """N random ordinary tokens, drawn per sample from the run seed."""
    return random_tokens(sample, ctx.tokenizer, ctx.n_tokens, ctx.seed)


@register_source("static", arg="<name>", accepted=lambda static_set: static_set, noun="static surrogate",
                 needs=("static_set",))
def _static(sample, ctx, arg) -> str:
    """A fixed intent question from the static set."""
    return ctx.static_set[arg]


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


def derangement(samples: Sequence, seed: int, needed_by: SourceInfo | None = None) -> dict[str, str]:
    """sample_id -> donor sample_id, the run's donors (``generated_other``'s and any source's taking a donor): no
    sample is its own donor, and no sample gets a donor with an identical document (same passage text) unless the
    selection makes that unavoidable. ``needed_by``: the source the messages name.

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
        raise ConfigError(f"surrogate source {_spelling(needed_by)} gives each sample {_what(needed_by)}, so it needs "
                          f"at least 2 samples; the selection has {len(ids)}. Raise dataset.n_samples or drop the "
                          f"{_name(needed_by)} condition.")
    rng = _rng(seed, "", "generated_other")
    groups: dict[str, list[str]] = {}
    for sid in ids:
        groups.setdefault(by_id[sid], []).append(sid)
    ordered = [groups[doc] for doc in sorted(groups)]  # a fixed starting order before the seeded shuffle
    order = [sid for k in rng.permutation(len(ordered)) for sid in rng.permutation(ordered[k]).tolist()]
    n, m = len(order), max(len(g) for g in ordered)
    shift = m if m < n else 1
    return {order[i]: order[(i + shift) % n] for i in range(n)}


def donor_outside(sample, samples: Sequence, seed: int, needed_by: SourceInfo | None = None) -> str:
    """A donor for a sample outside the run's selection (``kvprime walkthrough sample=<id>``): one selected
    sample with another document, drawn from (seed, sample id), so the selection's own donors are unchanged."""
    others = sorted(s.sample_id for s in samples if s.sample_id != sample.sample_id and s.passage != sample.passage)
    others = others or sorted(s.sample_id for s in samples if s.sample_id != sample.sample_id)
    if not others:
        what = "a surrogate from" if needed_by is None or needed_by.generates else "as its donor"
        raise ConfigError(f"surrogate source {_spelling(needed_by)} needs another sample to take {what}; the "
                          "selection has none. Raise dataset.n_samples.")
    return others[int(_rng(seed, sample.sample_id, "generated_other").integers(len(others)))]


# The donor messages name the source that needs the donors (generated_other's when none is given).
def _spelling(info: SourceInfo | None) -> str:
    return info.spelling if info is not None else "generated_other:<template>"


def _name(info: SourceInfo | None) -> str:
    return info.name if info is not None else "generated_other"


def _what(info: SourceInfo | None) -> str:
    return "another sample's generated surrogate" if info is None or info.generates else "another sample (a donor)"


# kvprime's own sources as conditions spell them (a plugin's are in ``spellings()`` once it is loaded); reading them
# discovers this package's modules (``generated``, ``sibling_query``), which register theirs.
SOURCES = spellings()
