"""Surrogate source ``sibling_query``: another real question about the same passage.

The realistic middle ground between the oracle (``query``) and a generated guess: a deployed cache is primed
with one user's question and serves the next users' questions about the same document. So each passage gets
one primer, a seeded choice among its selected questions (seeded from the run seed and the passage, never the
shard or batch): every other question of the passage is primed with it, and the primer itself, which would
otherwise get its own question (the oracle), gets the seeded order's next question; a question worded exactly
as the one asked is passed over. A passage's sibling caches are then two encodes whatever its number of
questions (duplicate wordings aside), and the engine's memo shares them within the chunk.

A selected question alone on its passage has no sibling: the run stops before any model loads and says to
set ``dataset.group_by_passage=true``, which selects whole passages of at least two questions.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...data.passages import groups, passage_id
from ...errors import ConfigError
from . import _rng, register_source


def primers(selection: Sequence, seed: int) -> dict[str, list[str]]:
    """passage_id -> the passage's selected sample ids in the seeded primer order (first: the primer)."""
    out = {}
    for group in groups(selection):
        pid = passage_id(group[0])
        ids = sorted(s.sample_id for s in group)  # sorted: the data file's order does not matter
        out[pid] = [ids[int(k)] for k in _rng(seed, pid, "sibling_query").permutation(len(ids))]
    return out


def siblings(selection: Sequence, seed: int) -> dict[str, str]:
    """sample_id -> the sample_id of its sibling (see the module docstring); ConfigError if a selected sample
    is the only selected question of its passage."""
    order = primers(selection, seed)
    alone = [ids[0] for ids in order.values() if len(ids) < 2]
    if alone:
        raise ConfigError(
            f"surrogate source sibling_query primes each question with another question about its passage, but "
            f"{len(alone)} of the {len(selection)} selected samples are the only selected question of their "
            f"passage (e.g. {alone[0]!r}). Set dataset.group_by_passage=true (whole passages with at least two "
            "questions), or drop the sibling_query condition.")
    query = {s.sample_id: s.query for s in selection}

    def sibling(sid: str, ids: list[str]) -> str:
        # The first other question in the seeded order: the primer, or for the primer the next one. A question
        # worded exactly as this one (SQuAD repeats a few) would be the oracle, so it is passed over if it can be.
        others = [o for o in ids if o != sid]
        return next((o for o in others if query[o] != query[sid]), others[0])

    return {sid: sibling(sid, ids) for ids in order.values() for sid in ids}


def _prepare(selection: Sequence, seed: int) -> dict:
    queries = {s.sample_id: s.query for s in selection}
    return {sid: queries[sib] for sid, sib in siblings(selection, seed).items()}


@register_source("sibling_query", needs=("state", "siblings", "seed"), prepare=_prepare)
def sibling_query(sample, ctx, arg) -> str:
    """Another real question about the same passage (one seeded primer per passage)."""
    if sample.sample_id in ctx.state:
        return ctx.state[sample.sample_id]
    # A sample outside the selection (kvprime walkthrough sample=<id>): a seeded pick among the selection's
    # questions of its passage, so the selection's own siblings are unchanged.
    others = sorted((s.sample_id, s.query) for s in ctx.siblings)
    if not others:
        raise ConfigError(f"surrogate source sibling_query: sample {sample.sample_id!r} has no other selected "
                          "question about its passage. Choose a sample of the selection.")
    return others[int(_rng(ctx.seed, sample.sample_id, "sibling_query").integers(len(others)))][1]
