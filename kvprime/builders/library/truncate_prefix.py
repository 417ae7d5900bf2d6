"""Encode [sink, prefix, document], keep [sink, document]: the primed-and-truncated cache.

After the prefix's S entries are cut, the document's keys are still rotated for positions S too far.
``rope_fix`` says what to do about it:

- ``none``: nothing (the notebooks' "broken" condition). The document keys stay rotated for positions
  S too far along while scoring continues at the cache's end, so the query sees the document S positions
  closer than it is (and its last S keys as if they lay in the query's future).
- ``rerotate``: rotate the kept document keys by -S, angles in fp32 from each layer's ``inv_freq``.
- ``shift``: no re-rotation at all: encode the same tokens with every position id lowered by S, so the
  document's keys are computed at their final positions directly (attention depends on relative positions
  only, so the document's states are the same); the sink's entries come from an encode of the sink alone,
  which is what the sink is in any encode, since it is first and sees only itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from .. import Builder, EncodeRequest, PrimedCache, register_builder

ROPE_FIXES = ("none", "rerotate", "shift")


@dataclass(frozen=True)
class TruncatePrefixParams:
    rope_fix: str | None = None  # required: none | rerotate | shift

    def validate(self) -> None:
        if self.rope_fix not in ROPE_FIXES:
            raise ConfigError(f"builder truncate_prefix needs rope_fix, one of {', '.join(ROPE_FIXES)}; "
                              f"got {self.rope_fix!r}.")


@register_builder("truncate_prefix")
class TruncatePrefix(Builder):
    """Encode sink+prefix+document, keep sink+document; rope_fix none | rerotate | shift."""

    params = TruncatePrefixParams
    roles = {"prefix": "cut"}

    def notes(self, params: TruncatePrefixParams) -> str | None:
        if params.rope_fix == "none":
            return ("rope_fix=none reproduces the notebooks' uncorrected truncation: the document keys stay rotated "
                    "for positions S tokens too far along while scoring continues at the cache's end, so the query "
                    "sees the document S positions closer than it is.")
        if params.rope_fix == "shift":
            return ("rope_fix=shift builds the truncated cache with no re-rotation (position ids lowered by S at "
                    "encode time); its difference from the rerotate twin is the re-rotation round-off floor.")
        return None

    def plan(self, seg, spec) -> list[EncodeRequest]:
        ids, start = seg.sink + seg.prefix + seg.document, spec.position_offset
        if spec.rope_fix == "shift":
            out = [EncodeRequest(ids, tuple(range(start - len(seg.prefix), start - len(seg.prefix) + len(ids))))]
            if seg.sink:
                out.append(EncodeRequest(seg.sink, tuple(range(start, start + len(seg.sink))), keep=True))
            return out
        return [EncodeRequest(ids, tuple(range(start, start + len(ids))))]

    def build(self, engine, seg, spec) -> PrimedCache:
        from ...cache import hf_internals as hf  # lazy: torch; `kvprime conditions`/`report` read builders without it

        if spec.rope_fix != "none":
            hf.check_config_supports(engine.model.config, spec.rope_fix)
        n_sink, n_prefix, n_doc = len(seg.sink), len(seg.prefix), len(seg.document)
        start, doc_from = spec.position_offset, n_sink + n_prefix
        kept_ids, kept_pos = list(seg.sink + seg.document), list(range(start, start + n_sink + n_doc))
        requests = self.plan(seg, spec)
        joint_req = requests[0]
        joint = engine.encode(joint_req.ids, joint_req.positions)

        if spec.rope_fix == "shift":
            parts = [(joint, doc_from, doc_from + n_doc, 0)]
            if n_sink:
                sink = engine.encode(requests[1].ids, requests[1].positions, keep=True)
                parts.insert(0, (sink, 0, n_sink, 0))
            rope = None
        elif spec.rope_fix == "rerotate":
            parts, rope = [(joint, 0, n_sink, 0), (joint, doc_from, doc_from + n_doc, -n_prefix)], engine.rope
        else:  # none: keys stay where they were encoded
            parts, rope = [(joint, 0, n_sink, 0), (joint, doc_from, doc_from + n_doc, 0)], None
            kept_pos = list(joint_req.positions[:n_sink] + joint_req.positions[doc_from:])
        cache = hf.assemble(engine.model, parts, rope)
        return PrimedCache(cache, kept_ids, kept_pos, start + n_sink + n_doc, ("sink", "document"),
                           len(joint_req.ids), notes={"rope_fix": spec.rope_fix, "surrogate_tokens": n_prefix})
