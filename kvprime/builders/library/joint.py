"""Encode every document together after the sink and keep it all: the full-prefill reference of a
multi-document context (each document attends to the ones before it), what ``independent`` caching gives up."""

from __future__ import annotations

from ...errors import ConfigError
from .. import EncodeRequest, PrimedCache, register_builder, register_planner

WHY = "builder joint encodes [sink, documents] only (builder full keeps a prefix or suffix)."


def _encode(seg, spec) -> EncodeRequest:
    if seg.prefix or seg.suffix:  # refused before any model loads (``refuses``); segments built by hand here
        raise ConfigError(f"condition {spec.name!r}: builder joint takes no prefix_template or suffix_template: "
                          f"{WHY}")
    ids = seg.sink + seg.document
    return EncodeRequest(ids, tuple(range(spec.position_offset, spec.position_offset + len(ids))))


@register_planner("joint")
def plan_joint(seg, spec) -> list[EncodeRequest]:
    return [_encode(seg, spec)]


@register_builder("joint", refuses={"prefix_template": WHY, "suffix_template": WHY})
def build_joint(engine, seg, spec) -> PrimedCache:
    """Encode sink + every document in context order, in one pass, and keep every entry."""
    req = _encode(seg, spec)
    positions = list(req.positions)
    cache = engine.encode(req.ids, positions)
    kept = tuple(s.name for s in seg.spans)
    return PrimedCache(cache, list(req.ids), positions, positions[-1] + 1, kept, len(req.ids))
