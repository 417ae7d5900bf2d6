"""Encode [sink, prefix, document], keep [sink, document]: the primed-and-truncated cache.

After the prefix's S entries are cut, the document's keys are still rotated for positions S too far.
``rope_fix`` says what to do about it:

- ``none``: nothing (the notebooks' "broken" condition). Scoring continues at the cache's end, so the
  query sees the document S positions further away than it is.
- ``rerotate``: rotate the kept document keys by -S, angles in fp32 from each layer's ``inv_freq``.
- ``shift``: no re-rotation at all: encode the same tokens with every position id lowered by S, so the
  document's keys are computed at their final positions directly (attention depends on relative positions
  only, so the document's states are the same); the sink's entries come from an encode of the sink alone,
  which is what the sink is in any encode, since it is first and sees only itself.
"""

from __future__ import annotations

from .. import hf_internals as hf
from . import PrimedCache, register_builder


@register_builder("truncate_prefix")
def build_truncate_prefix(engine, seg, spec) -> PrimedCache:
    """Encode sink+prefix+document, keep sink+document; rope_fix none | rerotate | shift."""
    if spec.rope_fix != "none":
        hf.check_config_supports(engine.model.config, spec.rope_fix)
    n_sink, n_prefix, n_doc = len(seg.sink), len(seg.prefix), len(seg.document)
    ids = seg.sink + seg.prefix + seg.document
    start = spec.position_offset
    kept_ids = list(seg.sink + seg.document)
    doc_from = n_sink + n_prefix

    if spec.rope_fix == "shift":
        positions = list(range(start - n_prefix, start - n_prefix + len(ids)))
        joint = engine.encode(ids, positions)
        parts = [(joint, doc_from, doc_from + n_doc, 0)]
        if n_sink:
            sink = engine.encode(seg.sink, list(range(start, start + n_sink)), keep=True)
            parts.insert(0, (sink, 0, n_sink, 0))
        cache = hf.assemble(engine.model, parts)
        kept_pos = list(range(start, start + n_sink + n_doc))
        return PrimedCache(cache, kept_ids, kept_pos, start + n_sink + n_doc, ("sink", "document"), len(ids))

    positions = list(range(start, start + len(ids)))
    joint = engine.encode(ids, positions)
    if spec.rope_fix == "rerotate":
        delta, rope = -n_prefix, engine.rope
        kept_pos = list(range(start, start + n_sink + n_doc))
    else:  # none: keys stay where they were encoded
        delta, rope = 0, None
        kept_pos = positions[:n_sink] + positions[doc_from:]
    cache = hf.assemble(engine.model, [(joint, 0, n_sink, 0), (joint, doc_from, doc_from + n_doc, delta)], rope)
    return PrimedCache(cache, kept_ids, kept_pos, start + n_sink + n_doc, ("sink", "document"), len(ids),
                       notes={"rope_fix": spec.rope_fix, "surrogate_tokens": n_prefix})
