"""Encode [sink, document, suffix] and keep [sink, document].

Under causal attention the document never sees the suffix, so the kept entries equal the bare cache's up to
float rounding: the condition is a control, not an effect (exp01's D1).
"""

from __future__ import annotations

from .. import Builder, EncodeRequest, PrimedCache, register_builder


@register_builder("truncate_suffix")
class TruncateSuffix(Builder):
    """Encode sink+document+suffix, keep sink+document (positions are already right)."""

    roles = {"suffix": "cut"}

    def notes(self, params) -> str:
        return ("Suffix-truncated conditions keep exactly the entries of the bare cache (under causal attention the "
                "document never sees the suffix); any difference from the matching bare condition is float "
                "rounding, not an effect.")

    def plan(self, seg, spec) -> list[EncodeRequest]:
        ids = seg.sink + seg.document + seg.suffix
        return [EncodeRequest(ids, tuple(range(spec.position_offset, spec.position_offset + len(ids))))]

    def build(self, engine, seg, spec) -> PrimedCache:
        from ...cache import hf_internals as hf  # lazy: torch; `kvprime conditions`/`report` read builders without it

        (req,) = self.plan(seg, spec)
        ids, start, positions = req.ids, spec.position_offset, list(req.positions)
        full = engine.encode(ids, positions)
        keep = len(seg.sink) + len(seg.document)
        cache = hf.assemble(engine.model, [(full, 0, keep, 0)])
        return PrimedCache(cache, list(ids[:keep]), positions[:keep], start + keep, ("sink", "document"), len(ids))
