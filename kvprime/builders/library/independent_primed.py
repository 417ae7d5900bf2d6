"""Each document encoded after its own surrogate, the surrogate cut, the document moved to its slot, the caches
concatenated behind one sink: ``independent`` with priming.

Per document i: encode [sink, prefix_i, document_i], keep document_i's entries, move them to the document's
slot in the concatenation (``rope_fix``: rerotate by slot - encoded position, or shift: encode at positions
that put the document at its slot). With one document this is exactly ``truncate_prefix`` with the same
surrogate. ``other_sinks`` as for ``independent`` (default drop). A prefix span primes every document after it:
static, query and random-query sources give one surrogate text, tokenized once, for every document; a
generated source gives each passage its own (``surrogate_per_document``: one prefix span before each document).
"""

from __future__ import annotations

from .. import EncodeRequest, PrimedCache, register_builder, register_planner
from .independent import NO_SUFFIX, IndependentParams, build, plan


def _notes(params: IndependentParams) -> str:
    return (f"Independent primed caches: each document encoded after its own surrogate, the surrogate cut and the "
            f"document moved to its slot with rope_fix={params.rope_fix} (other_sinks={params.other_sinks}).")


@register_planner("independent_primed")
def plan_independent_primed(seg, spec) -> list[EncodeRequest]:
    return plan(seg, spec, primed=True)


@register_builder("independent_primed", params=IndependentParams, roles={"prefix": "cut"}, notes=_notes,
                  surrogate_per_document=True, refuses={"suffix_template": NO_SUFFIX})
def build_independent_primed(engine, seg, spec) -> PrimedCache:
    """Encode [sink, surrogate, document_i] per document, cut the surrogate, concatenate at the slots."""
    return build(engine, seg, spec, primed=True)
