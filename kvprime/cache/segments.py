"""Token segments: every piece of text is tokenized on its own and the ids are concatenated.

Tokenizing a joined string and subtracting a separately tokenized prefix (the notebooks' way) mis-assigns a
token wherever the tokenizer merges across the boundary. Tokenizing each segment alone makes the document's
ids the same in every condition by construction.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..errors import ConfigError

CACHE_SEGMENTS = ("sink", "prefix", "document", "suffix")
SCORE_SEGMENTS = ("prompt", "answer")

# The only fields each template may use. A prefix or suffix sees the surrogate, never the real query,
# unless the condition's surrogate source *is* the query: that keeps leaks a config decision.
TEMPLATE_FIELDS = {
    "prefix_template": {"surrogate"},
    "document_template": {"document"},
    "suffix_template": {"surrogate"},
    "prompt_template": {"query"},
    "answer_template": {"answer"},
}


def template_fields(template: str) -> set[str]:
    """Names used as ``{field}`` in a str.format template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def tokenize(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sink_ids(tokenizer, policy: str) -> list[int]:
    """The first cache entry. ``bos``: the tokenizer's BOS token, kept even when its tokenizer does not
    add it by itself (SmolLM2), because the notebooks keep BOS in every cache as the attention sink."""
    if policy == "none":
        return []
    if policy == "bos":
        if tokenizer.bos_token_id is None:
            raise ConfigError(
                "model.sink=bos, but this tokenizer defines no BOS token. Accepted: model.sink=none (no sink "
                "entry) or a tokenizer with a bos_token."
            )
        return [int(tokenizer.bos_token_id)]
    raise ConfigError(f"model.sink={policy!r} is not a sink policy. Accepted: bos, none.")


ROLES = ("kept", "cut", "masked")  # what a builder does with a span's entries in the cache it returns


@dataclass(frozen=True)
class Span:
    """One piece of a cache context, tokenized on its own: its kind (sink, prefix, document, suffix), its name
    (``document_1`` when a sample has several passages) and its role: ``kept`` in the cache, ``cut`` out of it,
    or ``masked`` (kept, with its RoPE positions, but never attended to when scoring)."""

    kind: str
    ids: tuple[int, ...]
    name: str = ""
    role: str = "kept"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"span role {self.role!r} is not known. Accepted: {', '.join(ROLES)}.")
        if not self.name:
            object.__setattr__(self, "name", self.kind)


@dataclass(frozen=True)
class Segments:
    """A sample rendered for one condition: the cache context as ordered spans, then prompt and answer.

    ``sink``/``prefix``/``document``/``suffix`` are the concatenated ids of each kind's spans (a sample with
    several passages has several document spans, in order), kept as fields so builders and tests that think
    in the four kinds read them directly. Built from the four kinds, the spans are one per non-empty kind."""

    sink: tuple[int, ...] = ()
    prefix: tuple[int, ...] = ()
    document: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    prompt: tuple[int, ...] = ()
    answer: tuple[int, ...] = ()
    texts: dict = field(default_factory=dict, compare=False)
    spans: tuple[Span, ...] = ()

    def __post_init__(self) -> None:
        if not self.spans:
            spans = tuple(Span(kind, tuple(getattr(self, kind))) for kind in CACHE_SEGMENTS if getattr(self, kind))
            object.__setattr__(self, "spans", spans)
        else:
            for kind in CACHE_SEGMENTS:
                object.__setattr__(self, kind, tuple(i for s in self.spans if s.kind == kind for i in s.ids))

    def __len__(self) -> int:  # tokens a full encode + score needs
        return sum(len(s.ids) for s in self.spans) + len(self.prompt) + len(self.answer)

    @property
    def cache_ids(self) -> tuple[int, ...]:
        """Every span's ids in order: what an encode of the whole context sees."""
        return tuple(i for s in self.spans for i in s.ids)

    def with_roles(self, roles: Mapping[str, str]) -> Segments:
        """The same spans with the roles a builder declares per kind (kinds it does not name stay kept)."""
        spans = tuple(replace(s, role=roles.get(s.kind, s.role)) for s in self.spans)
        return replace(self, spans=spans)

    def span_slices(self) -> list[tuple[Span, int, int]]:
        """(span, start, end) entry offsets of each span in ``cache_ids``."""
        out, at = [], 0
        for s in self.spans:
            out.append((s, at, at + len(s.ids)))
            at += len(s.ids)
        return out


def build_segments(tokenizer, *, sink: list[int], texts: dict[str, str], documents: list[str] | None = None,
                   roles: dict[str, str] | None = None, prefixes: list[str] | None = None) -> Segments:
    """``texts`` maps prefix/document/suffix/prompt/answer to rendered text. ``documents`` (rendered passages)
    replaces ``texts["document"]`` for a sample with several: one span each, tokenized alone, so each
    document's ids are the same whatever else the context holds. ``prefixes`` (rendered, one per document)
    replaces ``texts["prefix"]``: each document then has its own prefix span (``prefix_<i>``) right before it."""
    tok = {name: tuple(tokenize(tokenizer, texts.get(name, ""))) for name in ("prefix", "suffix", "prompt",
                                                                             "answer")}
    docs = documents if documents is not None else [texts.get("document", "")]
    if prefixes is not None and len(prefixes) != len(docs):
        raise ValueError(f"{len(prefixes)} prefixes for {len(docs)} documents")
    spans = [Span("sink", tuple(sink))] if sink else []
    if tok["prefix"] and prefixes is None:
        spans.append(Span("prefix", tok["prefix"]))
    for i, text in enumerate(docs):
        ids = tuple(tokenize(tokenizer, text))
        own = tuple(tokenize(tokenizer, prefixes[i])) if prefixes is not None else ()
        if ids and own:
            spans.append(Span("prefix", own, f"prefix_{i}"))
        if ids:
            spans.append(Span("document", ids, "document" if len(docs) == 1 else f"document_{i}"))
    if tok["suffix"]:
        spans.append(Span("suffix", tok["suffix"]))
    roles = roles or {}
    spans = [replace(s, role=roles.get(s.kind, s.role)) for s in spans]
    return Segments(prompt=tok["prompt"], answer=tok["answer"], texts=dict(texts), spans=tuple(spans))
