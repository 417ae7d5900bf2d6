"""Keep everything that was encoded: [sink, prefix, document, suffix]."""

from __future__ import annotations

from . import PrimedCache, register_builder


@register_builder("full")
def build_full(engine, seg, spec) -> PrimedCache:
    """Encode sink+prefix+document+suffix and keep every entry (the surrogate stays in the cache)."""
    ids = seg.sink + seg.prefix + seg.document + seg.suffix
    start = spec.position_offset
    positions = list(range(start, start + len(ids)))
    cache = engine.encode(ids, positions)
    kept = tuple(n for n in ("sink", "prefix", "document", "suffix") if getattr(seg, n))
    return PrimedCache(cache, list(ids), positions, start + len(ids), kept, len(ids))
