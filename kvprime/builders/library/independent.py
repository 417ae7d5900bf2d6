"""Encode each document alone ([sink, document_i]) and concatenate the caches behind one sink.

This is how a RAG system reuses per-document caches: every document was encoded without seeing the others,
so the concatenation differs from the ``joint`` cache (all documents encoded together) only in the
cross-document attention it lacks. Each document's keys are moved to its slot in the concatenation with
``rope_fix``, exactly as truncation moves them:

- ``rerotate``: the document is encoded at the cache's start (right after the sink) and its keys are rotated
  forward to its slot, angles in fp32 from each layer's ``inv_freq``;
- ``shift``: the document is encoded with position ids that already put it at its slot (relative positions,
  and so every state, are those of an encode at the start); the sink comes from an encode of the sink alone.

``other_sinks`` says what happens to the other documents' own sink entries: ``drop`` (default: the cache then
holds exactly the joint cache's token ids and positions, so independent vs joint measures the missing
cross-document attention and nothing else) or ``keep`` (each document keeps its own sink in front of it, as
some systems store per-document caches; the cache is k-1 entries longer and later positions move up).

``independent_primed`` (its own module) uses the same machinery with a surrogate before each document.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from .. import Builder, EncodeRequest, PrimedCache, register_builder

NO_PREFIX = ("it encodes each document bare; to prime each document with a surrogate use builder "
             "independent_primed.")
NO_SUFFIX = ("it builds each document's cache from [sink, prefix, document] alone, with no place for a suffix; "
             "prime with a prefix_template and builder independent_primed.")

ROPE_FIXES = ("rerotate", "shift")
SINK_POLICIES = ("drop", "keep")


@dataclass(frozen=True)
class IndependentParams:
    rope_fix: str | None = None  # required: rerotate | shift
    other_sinks: str = "drop"  # drop | keep

    def validate(self) -> None:
        if self.rope_fix not in ROPE_FIXES:
            raise ConfigError(f"rope_fix={self.rope_fix!r} is not accepted: an independent builder moves each "
                              f"document's keys to its slot. Accepted: {', '.join(ROPE_FIXES)}.")
        if self.other_sinks not in SINK_POLICIES:
            raise ConfigError(f"other_sinks={self.other_sinks!r} is not accepted: what happens to the other "
                              f"documents' sink entries. Accepted: {', '.join(SINK_POLICIES)} (default drop).")


@dataclass(frozen=True)
class Piece:
    """One document of the concatenation: the surrogate it was encoded after, its ids, its name, and where its
    first entry goes (``slot``: a RoPE position)."""

    prefix: tuple[int, ...]
    document: tuple[int, ...]
    name: str
    slot: int


def layout(seg, spec, *, primed: bool) -> list[Piece]:
    """The documents in context order with their slots. A prefix span primes every document after it up to
    the next prefix span: one prefix before all documents (the same surrogate for each, as static, query and
    random sources give) or one before each."""
    # Conditions are refused these templates before any model loads (``REFUSES``); segments built by hand are
    # checked here.
    if seg.suffix:
        raise ConfigError(f"condition {spec.name!r}: builder {spec.builder} takes no suffix_template: {NO_SUFFIX}")
    if seg.prefix and not primed:
        raise ConfigError(f"condition {spec.name!r}: builder independent takes no prefix_template: {NO_PREFIX}")
    n_sink, keep = len(seg.sink), spec.settings.other_sinks == "keep"
    pieces: list = []
    prefix, at = (), spec.position_offset + n_sink
    for span in seg.spans:
        if span.kind == "prefix":
            prefix = span.ids
        elif span.kind == "document":
            if pieces and keep:
                at += n_sink  # this document's own sink sits in front of it
            pieces.append(Piece(prefix, span.ids, span.name, at))
            at += len(span.ids)
    return pieces


def _encode_start(piece: Piece, n_sink: int, spec) -> int:
    """The position of the encode's first token: the cache's start, or (shift) wherever puts the document at its
    slot."""
    if spec.rope_fix == "shift":
        return piece.slot - len(piece.prefix) - n_sink
    return spec.position_offset


def plan(seg, spec, *, primed: bool) -> list[EncodeRequest]:
    out, n_sink = [], len(seg.sink)
    pieces = layout(seg, spec, primed=primed)
    for piece in pieces:
        ids = seg.sink + piece.prefix + piece.document
        start = _encode_start(piece, n_sink, spec)
        out.append(EncodeRequest(ids, tuple(range(start, start + len(ids)))))
    if spec.rope_fix == "shift" and n_sink:  # the sinks, from encodes of the sink alone at their positions
        starts = [spec.position_offset] + ([p.slot - n_sink for p in pieces[1:]]
                                           if spec.settings.other_sinks == "keep" else [])
        out += [EncodeRequest(seg.sink, tuple(range(s, s + n_sink)), keep=s == spec.position_offset) for s in starts]
    return out


def build(engine, seg, spec, *, primed: bool) -> PrimedCache:
    """Encode [sink, prefix_i, document_i] for each document, keep each document's entries at its slot."""
    from ...cache import hf_internals as hf  # lazy: torch; `kvprime conditions`/`report` read builders without it

    hf.check_config_supports(engine.model.config, spec.rope_fix)
    pieces, n_sink = layout(seg, spec, primed=primed), len(seg.sink)
    requests = plan(seg, spec, primed=primed)
    encodes = [engine.encode(r.ids, r.positions, keep=r.keep) for r in requests]
    docs, sinks = encodes[:len(pieces)], encodes[len(pieces):]
    keep = spec.settings.other_sinks == "keep"
    parts, ids = [], []
    for i, (piece, cache) in enumerate(zip(pieces, docs, strict=True)):
        start = _encode_start(piece, n_sink, spec)
        if n_sink and (i == 0 or keep):
            if spec.rope_fix == "shift":
                parts.append((sinks[i], 0, n_sink, 0))
            else:  # the sink, encoded at the cache's start, rotated to where this document's sink sits
                parts.append((cache, 0, n_sink, piece.slot - n_sink - start))
            ids += seg.sink
        doc_from = n_sink + len(piece.prefix)
        delta = piece.slot - (start + doc_from)  # 0 under shift: encoded where it stays
        parts.append((cache, doc_from, doc_from + len(piece.document), delta))
        ids += piece.document
    cache = hf.assemble(engine.model, parts, engine.rope if spec.rope_fix == "rerotate" else None)
    start = spec.position_offset
    kept = (("sink",) if n_sink else ()) + tuple(p.name for p in pieces)
    return PrimedCache(cache, ids, list(range(start, start + len(ids))), start + len(ids), kept,
                       sum(len(r.ids) for r in requests[:len(pieces)]),
                       notes={"rope_fix": spec.rope_fix, "other_sinks": spec.settings.other_sinks,
                              "documents": len(pieces), "surrogate_tokens": sum(len(p.prefix) for p in pieces)})


@register_builder("independent")
class Independent(Builder):
    """Encode each document alone after the sink; concatenate the caches at the documents' slots."""

    params = IndependentParams
    refuses = {"prefix_template": NO_PREFIX, "suffix_template": NO_SUFFIX}
    primed = False  # whether a prefix span primes the documents after it (``independent_primed``)

    def notes(self, params: IndependentParams) -> str:
        sinks = ("the other documents' sinks dropped, so the cache holds the joint cache's ids and positions"
                 if params.other_sinks == "drop" else "each document keeping its own sink in front of it")
        return (f"Independent caches: each document encoded without the others, moved to its slot with "
                f"rope_fix={params.rope_fix}, {sinks}.")

    def extra_context(self, seg, params: IndependentParams) -> int:
        """With other_sinks=keep, every document after the first keeps its own sink in front of it."""
        documents = sum(1 for s in seg.spans if s.kind == "document")
        return (documents - 1) * len(seg.sink) if params.other_sinks == "keep" and documents > 1 else 0

    def plan(self, seg, spec) -> list[EncodeRequest]:
        return plan(seg, spec, primed=self.primed)

    def build(self, engine, seg, spec) -> PrimedCache:
        return build(engine, seg, spec, primed=self.primed)
