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

from .. import register_builder
from .independent import NO_SUFFIX, Independent, IndependentParams


@register_builder("independent_primed")
class IndependentPrimed(Independent):
    """Encode [sink, surrogate, document_i] per document, cut the surrogate, concatenate at the slots."""

    roles = {"prefix": "cut"}
    refuses = {"suffix_template": NO_SUFFIX}
    surrogate_per_document = True
    primed = True

    def notes(self, params: IndependentParams) -> str:
        return (f"Independent primed caches: each document encoded after its own surrogate, the surrogate cut and "
                f"the document moved to its slot with rope_fix={params.rope_fix} (other_sinks={params.other_sinks}).")
