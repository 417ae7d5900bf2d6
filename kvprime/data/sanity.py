"""The synthetic sanity example of notebook exp21 (000), as a one-sample dataset.

It is small enough to eyeball: if priming with the oracle query does not lower the NLL of
" Paris" here, something in the cache handling is broken before any real data is looked at.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from kvprime.data import register_loader
from kvprime.data.types import Sample

SANITY_SAMPLE = Sample(
    sample_id="exp21-sanity-france",
    passage="The capital of France is Paris. It is known for the Eiffel Tower.",
    query="What is the capital of France?",
    # No leading space: the scorer adds the separator itself, for every source alike.
    answer="Paris",
    answers=("Paris",),
    source="exp21_sanity",
    random_query="What is the population of Japan?",
)


@register_loader("exp21_sanity", options=())
def load_sanity(cfg: Mapping) -> Iterator[Sample]:
    """Yield the single synthetic sample; `cfg` has no options for this loader."""
    yield SANITY_SAMPLE
