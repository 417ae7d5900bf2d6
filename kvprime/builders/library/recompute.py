"""Selective recompute of an assembled multi-document cache: CacheBlend (arXiv 2405.16444) and EPIC (arXiv
2410.15332) as cache stages on ``independent`` and ``independent_primed``.

The assembled cache is built as its base builder builds it (same plan, same encodes, any ``rope_fix`` and
``other_sinks``); then a set S of its rows is recomputed with attention over the whole context in one forward
(``kvprime.cache.recompute``: the S tokens from their embeddings at their positions, the past being the cache
without S under an exact causal mask by position), and every layer's fresh S keys and values replace the stale
ones. ``rule`` chooses S:

- ``deviation`` (CacheBlend): a selection pass encodes the whole cache with full attention through layers
  0..``selection_layer`` (layer 0 in full; default 1, the reference implementation's check layer) and picks the
  ``ratio`` of candidate rows whose post-RoPE key at that layer is farthest, in squared L2 over kv heads and
  head dims (LMCache's distance), from the stale key. One set for all layers, recomputed from the embeddings: the
  paper's gradual filtering gives no schedule of ratios, so it is not attempted.
- ``first_k`` (EPIC): the first ``k`` rows of every document after the first (a kept sink counts as its
  document's first row, as EPIC recomputes each chunk's BOS).
- ``random``: ``ratio`` of the candidate rows, drawn with a seed made of ``seed`` and the sample's document ids
  (the same draw for every condition of a sample that has the same candidates).
- ``all``: every candidate row.

Candidate rows are the rows whose stale entries are not already the joint cache's: every row after the first
document (later documents, and their kept sinks). The first document saw everything before it (the sink), so a
bare first document is never a candidate; a primed first document was encoded after its surrogate, which the
joint cache lacks, so under ``independent_primed_recompute`` it is a candidate too. ``ratio`` counts candidate
rows (floor of ratio x candidates); a ratio of 0, ``k: 0`` or no candidates runs no forward at all.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass

from ...errors import ConfigError
from .. import PrimedCache, register_builder
from .independent import Independent, IndependentParams, layout
from .independent_primed import IndependentPrimed

RULES = ("deviation", "first_k", "random", "all")
BATCH_TOKENS = 8192  # cache rows one recompute forward holds across its samples


@dataclass(frozen=True)
class RecomputeParams(IndependentParams):
    rule: str = "deviation"  # deviation | first_k | random | all
    ratio: float = 0.15  # deviation, random: share of candidate rows recomputed
    k: int = 16  # first_k: rows recomputed at the start of every document after the first
    selection_layer: int = 1  # deviation: the layer whose keys rank the rows (layers below it run in full)
    seed: int = 0  # random: mixed with the sample's document ids

    def validate(self) -> None:
        super().validate()
        if self.rule not in RULES:
            raise ConfigError(f"rule={self.rule!r} is not a recompute rule. Accepted: {', '.join(RULES)}.")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio!r} is not accepted: the share of candidate rows recomputed, a "
                              "number from 0 to 1.")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"k={self.k!r} is not accepted: rows recomputed per document, an integer >= 0.")
        if isinstance(self.selection_layer, bool) or not isinstance(self.selection_layer, int) \
                or self.selection_layer < 1:
            raise ConfigError(f"selection_layer={self.selection_layer!r} is not accepted: an integer >= 1 (layer "
                              "0's keys depend on the token and position only, so they never deviate).")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r} is not accepted: an integer.")


def blocks(seg, spec, primed: bool) -> list[tuple[int, int]]:
    """Each document's cache rows [start, stop), a kept sink in front of a later document included."""
    keep, n_sink, offset = spec.settings.other_sinks == "keep", len(seg.sink), spec.position_offset
    out = []
    for i, piece in enumerate(layout(seg, spec, primed=primed)):
        start = piece.slot - offset - (n_sink if keep and i else 0)
        out.append((start, piece.slot - offset + len(piece.document)))
    return out


def candidates(seg, spec, primed: bool) -> list[int]:
    """Rows whose stale entries are not the joint cache's (module docstring)."""
    docs = blocks(seg, spec, primed)
    if not docs:
        return []
    first_primed = bool(layout(seg, spec, primed=primed)[0].prefix)
    start = docs[0][0] if first_primed else docs[0][1]
    return list(range(start, docs[-1][1]))


def share(ratio: float, n: int) -> int:
    return min(n, math.floor(ratio * n + 1e-9))  # 0.15 * 20 must give 3, not 2


def sample_seed(seg, seed: int) -> int:
    text = repr((seed, [s.ids for s in seg.spans if s.kind == "document"]))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class RecomputeStage(Independent):
    """The recompute stage a base builder's class is mixed with (its ``build`` makes the assembled cache)."""

    params = RecomputeParams

    def notes(self, params: IndependentParams) -> str:
        assert isinstance(params, RecomputeParams)  # this builder's own params (``params`` above)
        rules = {
            "deviation": f"CacheBlend: the {params.ratio:g} of candidate rows whose layer-{params.selection_layer} "
                         f"post-RoPE keys deviate most (squared L2) from a full-attention pass through layers "
                         f"0..{params.selection_layer}, one set for all layers (no gradual filtering)",
            "first_k": f"EPIC: the first {params.k} rows of every document after the first",
            "random": f"a seeded random {params.ratio:g} of candidate rows (control)",
            "all": "every candidate row",
        }
        return (f"{super().notes(params)} Then recomputed with attention over the whole context, exact causal "
                f"mask, one forward from the embeddings: {rules[params.rule]}. Candidates: rows after the first "
                f"document (and a primed first document); recompute work is counted as query-time work.")

    def select(self, engine, seg, spec, assembled: PrimedCache) -> list[int]:
        """S for one sample whose rule needs no model pass (deviation's is batched in ``build_many``)."""
        p = spec.settings
        pool = candidates(seg, spec, self.primed)
        if p.rule == "all":
            return pool
        if p.rule == "random":
            return sorted(random.Random(sample_seed(seg, p.seed)).sample(pool, share(p.ratio, len(pool))))
        if p.rule == "first_k":
            return [r for start, stop in blocks(seg, spec, self.primed)[1:]
                    for r in range(start, min(stop, start + p.k))]
        if share(p.ratio, len(pool)):
            raise ValueError(f"rule {p.rule} selects with a model pass")
        return []  # deviation at ratio 0 (or with no candidates): no selection pass

    def build(self, engine, seg, spec) -> PrimedCache:
        return self.build_many(engine, [(seg, spec)])[0]

    def build_many(self, engine, work) -> list[PrimedCache]:
        """Every (segments, spec) of ``work`` built: the assembled caches, then the selection passes and the
        recomputes, each one forward per batch of samples."""
        # lazy: torch (model-free commands read builders)
        from ...cache import hf_internals as hf
        from ...cache.recompute import BlendJob

        assembled = [super(RecomputeStage, self).build(engine, seg, spec) for seg, spec in work]
        for _, spec in work:
            if spec.settings.selection_layer >= engine.model.config.get_text_config(decoder=True).num_hidden_layers:
                raise ConfigError(f"condition {spec.name!r}: selection_layer={spec.settings.selection_layer} is "
                                  "not a layer of this model; use a layer below num_hidden_layers (default 1).")
        jobs = [BlendJob(hf.cache_layers(pc.cache), tuple(pc.token_ids), tuple(pc.position_ids)) for pc in assembled]
        t0 = time.perf_counter()
        rows, selected_by = self._select_all(engine, work, assembled, jobs)
        jobs = [BlendJob(j.layers, j.ids, j.positions, tuple(r)) for j, r in zip(jobs, rows, strict=True)]
        layers = []
        for batch in _batches(jobs):
            layers += _recompute(engine.model, batch)
        seconds = time.perf_counter() - t0
        return [self._result(engine, pc, job, out, selected_by[i], seconds * _weight(job, selected_by[i]) /
                             (sum(_weight(j, s) for j, s in zip(jobs, selected_by, strict=True)) or 1))
                for i, (pc, job, out) in enumerate(zip(assembled, jobs, layers, strict=True))]

    def _select_all(self, engine, work, assembled, jobs):
        """S per sample, and the selection pass each ran (None, or its layer)."""
        rows, selected_by, passes = [], [], []
        for i, ((seg, spec), pc) in enumerate(zip(work, assembled, strict=True)):
            p = spec.settings
            pool = candidates(seg, spec, self.primed)
            if p.rule == "deviation" and share(p.ratio, len(pool)):
                passes.append(i)
                rows.append(pool)
                selected_by.append(p.selection_layer)
            else:
                rows.append(self.select(engine, seg, spec, pc))
                selected_by.append(None)
        by_layer: dict[int, list[int]] = {}
        for i in passes:
            by_layer.setdefault(selected_by[i], []).append(i)
        for layer, members in by_layer.items():
            for batch in _batches([jobs[i] for i in members], indices=members):
                scores = _scores(engine.model, [jobs[i] for i in batch], layer)
                for i, s in zip(batch, scores, strict=True):
                    pool = rows[i]
                    n = share(work[i][1].settings.ratio, len(pool))
                    top = s[pool].argsort(descending=True, stable=True)[:n]
                    rows[i] = sorted(pool[t] for t in top.tolist())
        return rows, selected_by

    def _result(self, engine, pc: PrimedCache, job, layers, selection_layer, seconds) -> PrimedCache:
        from ...cache import hf_internals as hf

        n_layers = len(layers)
        n = len(job.ids)
        work = {"recompute_tokens": len(job.rows),
                "selection_token_layers": (selection_layer + 1) * n if selection_layer is not None else 0,
                "recompute_token_layers": n_layers * len(job.rows),
                "recompute_key_pairs": n_layers * job.key_pairs()
                + ((selection_layer + 1) * n * (n + 1) // 2 if selection_layer is not None else 0),
                "recompute_s": round(seconds, 6)}
        cache = pc.cache if not job.rows else hf.cache_from_layers(engine.model, layers)
        notes = {**pc.notes, "recompute_rows": list(job.rows), "query_work": work}
        return PrimedCache(cache, pc.token_ids, pc.position_ids, pc.next_position, pc.kept_segments,
                           pc.encoded_tokens, notes, pc.attend)


def _weight(job, selection_layer) -> int:
    """A sample's share of the stage's measured seconds: the token-layers its passes ran."""
    return len(job.rows) + ((selection_layer + 1) * len(job.ids) if selection_layer is not None else 0)


def _batches(jobs, indices=None):
    """Consecutive groups of jobs (or of ``indices``, one per job) holding at most BATCH_TOKENS cache rows."""
    items = indices if indices is not None else jobs
    batch, rows = [], 0
    for item, job in zip(items, jobs, strict=True):
        if batch and rows + len(job.ids) > BATCH_TOKENS:
            yield batch
            batch, rows = [], 0
        batch.append(item)
        rows += len(job.ids)
    if batch:
        yield batch


def _recompute(model, jobs):
    from ...cache.recompute import recompute_batch
    return recompute_batch(model, jobs)


def _scores(model, jobs, layer):
    from ...cache.recompute import deviation_scores
    return deviation_scores(model, jobs, layer)


@register_builder("independent_recompute")
class IndependentRecompute(RecomputeStage, Independent):
    """``independent``'s assembled cache, then a set of rows recomputed over the whole context (CacheBlend/EPIC)."""


@register_builder("independent_primed_recompute")
class IndependentPrimedRecompute(RecomputeStage, IndependentPrimed):
    """``independent_primed``'s assembled cache, then a set of rows recomputed over the whole context."""
