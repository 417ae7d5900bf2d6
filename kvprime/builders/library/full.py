"""Keep everything that was encoded: [sink, prefix, document, suffix]."""

from __future__ import annotations

from .. import Builder, EncodeRequest, PrimedCache, register_builder


@register_builder("full")
class Full(Builder):
    """Encode sink+prefix+document+suffix and keep every entry (the surrogate stays in the cache)."""

    def plan(self, seg, spec) -> list[EncodeRequest]:
        ids = seg.sink + seg.prefix + seg.document + seg.suffix
        return [EncodeRequest(ids, tuple(range(spec.position_offset, spec.position_offset + len(ids))))]

    def build(self, engine, seg, spec) -> PrimedCache:
        (req,) = self.plan(seg, spec)
        ids, start, positions = req.ids, spec.position_offset, list(req.positions)
        cache = engine.encode(ids, positions)
        kept = tuple(n for n in ("sink", "prefix", "document", "suffix") if getattr(seg, n))
        return PrimedCache(cache, list(ids), positions, start + len(ids), kept, len(ids))
