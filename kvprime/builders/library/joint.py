"""Encode every document together after the sink and keep it all: the full-prefill reference of a
multi-document context (each document attends to the ones before it), what ``independent`` caching gives up."""

from __future__ import annotations

from ...errors import ConfigError
from .. import Builder, EncodeRequest, PrimedCache, register_builder

WHY = "builder joint encodes [sink, documents] only (builder full keeps a prefix or suffix)."


@register_builder("joint")
class Joint(Builder):
    """Encode sink + every document in context order, in one pass, and keep every entry."""

    refuses = {"prefix_template": WHY, "suffix_template": WHY}

    def plan(self, seg, spec) -> list[EncodeRequest]:
        if seg.prefix or seg.suffix:  # refused before any model loads (``refuses``); segments built by hand here
            raise ConfigError(f"condition {spec.name!r}: builder joint takes no prefix_template or suffix_template: "
                              f"{WHY}")
        ids = seg.sink + seg.document
        return [EncodeRequest(ids, tuple(range(spec.position_offset, spec.position_offset + len(ids))))]

    def build(self, engine, seg, spec) -> PrimedCache:
        (req,) = self.plan(seg, spec)
        positions = list(req.positions)
        cache = engine.encode(req.ids, positions)
        kept = tuple(s.name for s in seg.spans)
        return PrimedCache(cache, list(req.ids), positions, positions[-1] + 1, kept, len(req.ids))
