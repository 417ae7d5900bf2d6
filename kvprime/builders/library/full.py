"""Keep everything that was encoded: [sink, prefix, document, suffix]."""

from __future__ import annotations

from .. import EncodeRequest, PrimedCache, register_builder, register_planner


def _encode(seg, spec) -> EncodeRequest:
    ids = seg.sink + seg.prefix + seg.document + seg.suffix
    return EncodeRequest(ids, tuple(range(spec.position_offset, spec.position_offset + len(ids))))


@register_planner("full")
def plan_full(seg, spec) -> list[EncodeRequest]:
    return [_encode(seg, spec)]


@register_builder("full")
def build_full(engine, seg, spec) -> PrimedCache:
    """Encode sink+prefix+document+suffix and keep every entry (the surrogate stays in the cache)."""
    req = _encode(seg, spec)
    ids, start, positions = req.ids, spec.position_offset, list(req.positions)
    cache = engine.encode(ids, positions)
    kept = tuple(n for n in ("sink", "prefix", "document", "suffix") if getattr(seg, n))
    return PrimedCache(cache, list(ids), positions, start + len(ids), kept, len(ids))
