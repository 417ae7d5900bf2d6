"""The engine: one model + tokenizer, and the three steps of every condition.

``segments`` renders and tokenizes a sample's texts, ``build`` runs a registered cache builder, ``score``
returns the answer NLL. Encodes are memoised by (token ids, first position) until ``forget()``, so
conditions that encode the same tokens (exp21's full_oracle and full_oracle_repeat) share one encode.

From a notebook::

    from kvprime import Engine
    eng = Engine.load("smollm2_135m_instruct")
    primed, seg = eng.prime("The capital of France is Paris.", surrogate="What is the capital of France?",
                            builder="truncate_prefix", rope_fix="rerotate")
    eng.nll(primed, query="What is the capital of France?", answer="Paris").nll
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Protocol, TypeVar, runtime_checkable

import torch

from ..cache import batch_caches, prefixes
from ..cache import hf_internals as hf
from ..cache.scoring import Score, score_answer, score_batch
from ..cache.segments import Segments, build_segments, sink_ids
from ..config import confdir
from ..errors import DataError
from ..models import loading
from . import EncodeRequest, PrimedCache
from .conditions import ConditionSpec, builder_of, validate

T = TypeVar("T")


@runtime_checkable
class BuildsMany(Protocol):
    """A builder that builds a chunk's samples of its conditions together (the recompute stage)."""

    def build_many(self, engine: Engine, work: list[tuple[Segments, ConditionSpec]]) -> list[PrimedCache]: ...


def _all_set(items: list[T | None]) -> list[T]:
    """``items`` once every slot has been filled (each index is filled exactly once by the loops that call this)."""
    done = [x for x in items if x is not None]
    assert len(done) == len(items)
    return done


@dataclass(frozen=True)
class EncodeRow:
    """One row of a model forward that builds a cache: its new token ids and their positions, continuing
    ``past`` (a cache of ``past_length`` entries) or, with ``past`` None, encoded from scratch."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    past: object = None
    past_length: int = 0


class Engine:
    def __init__(self, model, tokenizer, *, sink: str = "bos", max_context: int | None = None,
                 extend_prefixes: bool = False, config=None, stack_from_spans: bool = True):
        """``model=None`` with the model's ``config``: an engine for the checks before the weights load, whose
        ``segments`` and ``fits`` are the loaded engine's (building or scoring needs the model).
        ``stack_from_spans=False``: batches of caches are stacked by assembling each cache alone (the same
        tensors, more host work), the way ``kvprime bench`` times beside the default."""
        self.model = model
        self.tokenizer = tokenizer
        self.sink_policy = sink
        self.sink = sink_ids(tokenizer, sink)
        config = model.config if config is None else config
        self.max_context = max_context or getattr(config.get_text_config(decoder=True), "max_position_embeddings",
                                                  None)
        # sliding_windows reads only the model's config, so the config alone gives the loaded model's windows.
        self.windows = [w for w in hf.sliding_windows(SimpleNamespace(config=config)) if w is not None]
        self._rope: hf.RopeSpec | None = None
        self._memo: dict = {}
        self._kept: dict = {}
        self.n_encodes = 0  # model encodes actually run (memo hits excluded)
        self.n_openings = 0  # of which scratch encodes of an opening several encodes share (prefill)
        self.n_encoded_tokens = 0
        self.encode_lengths: list[int] = []  # tokens run through the model by each encode
        self.extend_prefixes = extend_prefixes  # continue encodes from the caches of their prefixes (prefill)
        self.stack_from_spans = stack_from_spans

    @classmethod
    def load(cls, model: str = "smollm2_135m_instruct", **overrides) -> Engine:
        """Load ``conf/model/<model>.yaml`` (fields can be overridden, e.g. ``dtype="bfloat16"``)."""
        cfg = confdir.load("model", model)
        cfg.update(overrides)
        m, tok, _ = loading.load(cfg)
        return cls(m, tok, sink=cfg.get("sink", "bos"), max_context=cfg.get("max_context"))

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def rope(self) -> hf.RopeSpec:
        if self._rope is None:
            self._rope = hf.rope_spec(self.model)
        return self._rope

    # ------------------------------------------------------------ steps

    def segments(self, spec: ConditionSpec, *, document: str, query: str, answer: str,
                 surrogate: str | Sequence[str] | None = None, documents: list[str] | None = None) -> Segments:
        """The condition's spans for a sample (each tokenized alone), with the roles its builder declares.
        ``documents``: a sample's several passages, one document span each (``document`` is then unused).
        ``surrogate`` as a tuple (one text per document): each document gets its own prefix span before it."""
        own = list(surrogate) if isinstance(surrogate, (tuple, list)) else None
        if own is not None:
            if not documents or len(own) != len(documents):
                raise ValueError(f"{len(own)} per-document surrogates for {len(documents or [])} documents")
            surrogate = None
        texts = {
            "prefix": spec.prefix_template.format(surrogate=surrogate) if spec.prefix_template else "",
            "document": spec.document_template.format(document=document),
            "suffix": spec.suffix_template.format(surrogate=surrogate) if spec.suffix_template else "",
            "prompt": spec.prompt_template.format(query=query),
            "answer": spec.answer_template.format(answer=answer),
        }
        rendered = [spec.document_template.format(document=d) for d in documents] if documents else None
        prefixes = [spec.prefix_template.format(surrogate=t) for t in own] if own is not None else None
        return build_segments(self.tokenizer, sink=self.sink, texts=texts, documents=rendered,
                              roles=dict(builder_of(spec).roles), prefixes=prefixes)

    @staticmethod
    def context_needed(seg: Segments, spec: ConditionSpec) -> int:
        """Tokens a condition's encode + score spans: the sample's spans, plus any entries its builder adds
        (the builder's ``extra_context``: independent's kept sinks)."""
        return len(seg) + builder_of(spec).extra_context(seg, spec.settings)

    def fits(self, seg: Segments, spec: ConditionSpec) -> bool:
        """Whether encode + score stays inside the model's context (offset included) and, for sliding-window
        models, inside the window (a longer sample's caches would not match their references)."""
        need = self.context_needed(seg, spec)
        if self.windows and need >= min(self.windows):
            return False
        return self.max_context is None or spec.position_offset + need <= self.max_context

    def build(self, spec: ConditionSpec, seg: Segments) -> PrimedCache:
        self._check_window(spec, seg)
        return builder_of(spec).build(self, seg, spec)

    def _check_window(self, spec: ConditionSpec, seg: Segments) -> None:
        need = self.context_needed(seg, spec)
        if self.windows and need >= min(self.windows):
            raise DataError(
                f"condition {spec.name!r}: the sample needs {need} tokens (encode + prompt + answer), which "
                f"crosses this model's sliding attention window of {min(self.windows)} tokens; a truncated or "
                "scored cache would then not match its reference. Use shorter passages "
                "(dataset.filters.max_passage_words) or a model without sliding-window layers."
            )

    def build_chunk(self, work) -> list[PrimedCache]:
        """Each (spec, segments) of a chunk built. A builder with ``build_many(engine, [(seg, spec)])`` (the
        recompute stage) gets all its samples of the chunk at once, so its own model passes run as batches."""
        out: list[PrimedCache | None] = [None] * len(work)
        together: dict[str, list[int]] = {}
        for i, (spec, seg) in enumerate(work):
            if isinstance(builder_of(spec), BuildsMany):
                together.setdefault(spec.builder, []).append(i)
            else:
                out[i] = self.build(spec, seg)
        for members in together.values():
            for i in members:
                self._check_window(*work[i])
            builder = builder_of(work[members[0]][0])
            assert isinstance(builder, BuildsMany)  # grouped above for having build_many
            built = builder.build_many(self, [(work[i][1], work[i][0]) for i in members])
            for i, pc in zip(members, built, strict=True):
                out[i] = pc
        return _all_set(out)

    def score(self, primed: PrimedCache, seg: Segments, *, per_token: bool = False) -> Score:
        return score_answer(self.model, primed, seg.prompt, seg.answer, per_token=per_token)

    def encode(self, ids, positions, *, keep: bool = False) -> object:
        """KV cache of ``ids`` at ``positions``, memoised. ``keep=True`` for encodes that are the same for
        every sample (the sink alone): they survive ``forget()``. Callers must not modify the result
        beyond appending and cropping back (the scorer's way)."""
        key = (tuple(ids), int(positions[0]), len(positions))
        cache = self._kept.get(key) or self._memo.get(key)
        if cache is None:
            (cache,) = self._encode_batch([EncodeRow(tuple(ids), tuple(positions))])
            (self._kept if keep else self._memo)[key] = cache
        return cache

    def _encode_batch(self, rows: list[EncodeRow]) -> list:
        """One cache per row, from one model forward over the rows right-padded: all fresh, or all continuing
        their pasts. Every encode the engine runs goes through here (a subclass may override it to observe
        them: the bench counts each row's new tokens and past entries)."""
        ids, pos = self._padded([(r.ids, r.positions) for r in rows])
        lengths = [len(r.ids) for r in rows]
        if rows[0].past is not None:
            caches = batch_caches.extend_batch(self.model, [r.past for r in rows], ids, pos, lengths,
                                               from_spans=self.stack_from_spans)
        elif len(rows) == 1:
            caches = [hf.encode(self.model, ids, pos)]
        else:
            caches = hf.encode_batch(self.model, ids, pos, lengths)
        self.n_encodes += len(rows)
        self.n_encoded_tokens += sum(lengths)
        self.encode_lengths += lengths
        return caches

    def plan(self, spec: ConditionSpec, seg: Segments) -> list[EncodeRequest]:
        """The encodes a condition's builder will ask for (its ``plan``)."""
        return builder_of(spec).plan(seg, spec)

    def prefill(self, requests, *, batch_tokens: int = 4096) -> None:
        """Run every distinct, not yet memoised encode of ``requests`` as right-padded batches of similar
        lengths (at most ``batch_tokens`` padded tokens a batch), so the builders then find them memoised.

        With ``extend_prefixes``, an encode whose ids and positions begin with another's (planned, memoised, or
        an opening several share) continues from that cache and encodes only its remaining tokens
        (``kvprime.cache.prefixes``); level by level, fresh encodes and continuations each run as batches."""
        todo: dict[object, EncodeRequest] = {}
        for req in requests:
            if req.key not in self._memo and req.key not in self._kept:
                todo.setdefault(req.key, req)
        if not todo:
            return
        if not self.extend_prefixes:
            for batch in self._fresh_batches(list(todo.values()), batch_tokens):
                self._run_fresh(batch, {})
            return
        available = [(k[0], tuple(range(k[1], k[1] + k[2]))) for k in (*self._kept, *self._memo)]
        steps = prefixes.plan_steps(list(todo.values()), available)
        limit = self._window_limit()
        for s in steps:  # a sliding layer would drop the first entries of a longer one (see _continuation_batches)
            if limit is not None and len(s.ids) > limit:
                s.parent = None
        made = {id(s): self._cached(s) for s in steps if s.ready}  # this prefill's caches, scratch ones too
        for level in sorted({s.level for s in steps if not s.ready}):
            here = [s for s in steps if s.level == level]
            for batch in self._fresh_batches([s for s in here if s.parent is None], batch_tokens):
                self._run_fresh(batch, made)
            for batch in self._continuation_batches([s for s in here if s.parent is not None], batch_tokens):
                self._run_continuations(batch, made)

    def _cached(self, step):
        key = (step.ids, step.positions[0], len(step.positions))
        return self._kept.get(key) or self._memo[key]

    def _window_limit(self) -> int | None:
        # A sliding-window cache keeps only its last window-1 entries, and sliding layers mask by column of the
        # padded batch: padding could push a row's real entries out of its window.
        return min(self.windows) - 1 if self.windows else None

    def _batches(self, items, batch_tokens, *, order, width):
        """``items`` sorted by ``order`` and cut into batches whose rows times padded ``width(rows)`` stay within
        ``batch_tokens``, and whose width stays inside a sliding window."""
        limit = self._window_limit()
        batch: list = []
        for item in sorted(items, key=order) + [None]:
            w = width(batch + [item]) if item is not None else 0
            if batch and (item is None or (len(batch) + 1) * w > batch_tokens or (limit is not None and w > limit)):
                yield batch
                batch = []
            if item is not None:
                batch.append(item)

    def _fresh_batches(self, items, batch_tokens):
        """Items (with ``ids``) grouped by similar length (sorted ascending: the last row is the widest)."""
        return self._batches(items, batch_tokens, order=lambda r: len(r.ids), width=lambda rows: len(rows[-1].ids))

    def _continuation_batches(self, steps, batch_tokens):
        """Continuations grouped by new length (the padded work), then past length; the padded width is the
        longest past plus the longest new part."""
        return self._batches(steps, batch_tokens, order=lambda s: (len(s.ids) - s.past, s.past),
                             width=lambda rows: max(len(s.ids) - s.past for s in rows) + max(s.past for s in rows))

    def _padded(self, rows):
        """Right-padded ids and positions of (ids, positions) rows; pads continue each row's positions and are
        never attended to by a real token."""
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([list(i) + [0] * (width - len(i)) for i, _ in rows], device=self.device)
        pos = torch.tensor([list(p) + list(range(p[-1] + 1, p[-1] + 1 + width - len(p))) for _, p in rows],
                           device=self.device)
        return ids, pos

    def _run_fresh(self, batch, made) -> None:
        caches = self._encode_batch([EncodeRow(tuple(r.ids), tuple(r.positions)) for r in batch])
        for item, cache in zip(batch, caches, strict=True):
            self._record(item, cache, made)

    def _run_continuations(self, batch, made) -> None:
        caches = self._encode_batch([EncodeRow(tuple(s.ids[s.past:]), tuple(s.positions[s.past:]),
                                               made[id(s.parent)], s.past) for s in batch])
        for step, cache in zip(batch, caches, strict=True):
            self._record(step, cache, made)

    def _record(self, item, cache, made) -> None:
        """Memoise a planned encode's cache (an EncodeRequest, or a plan step serving one); a step that serves
        no request is a scratch opening several encodes continue from."""
        made[id(item)] = cache
        req = getattr(item, "request", item)
        if req is not None:
            (self._kept if req.keep else self._memo)[req.key] = cache
        else:
            self.n_openings += 1

    def score_many(self, items, *, per_token: bool = False, batch_tokens: int = 4096) -> list[Score]:
        """Scores of several (primed cache, segments) pairs, batched by cache length within ``batch_tokens``."""
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        out: list[Score | None] = [None] * len(items)
        group: list[int] = []
        # Sliding layers mask by index in the padded batch: the padded cache width plus the padded input
        # width must stay inside the window, or a row's first entries fall out of its window.
        window = min(self.windows) if self.windows else None
        longest_input = 0
        for i in order + [None]:
            width = len(items[i][0]) if i is not None else 0
            row = len(items[i][1].prompt) + len(items[i][1].answer) if i is not None else 0
            too_wide = window is not None and width + max(longest_input, row) >= window
            if group and (i is None or (len(group) + 1) * width > batch_tokens or too_wide):
                scores = score_batch(self.model, [(items[j][0], items[j][1].prompt, items[j][1].answer)
                                                  for j in group], per_token=per_token,
                                     from_spans=self.stack_from_spans)
                for j, sc in zip(group, scores, strict=True):
                    out[j] = sc
                group, longest_input = [], 0
            if i is not None:
                group.append(i)
                longest_input = max(longest_input, row)
        return _all_set(out)

    def run_chunk(self, work, *, per_token: bool = False, encode_tokens: int = 4096,
                  score_tokens: int = 8192) -> list[tuple[PrimedCache, Score]]:
        """Build and score a chunk of (spec, segments): its distinct encodes batched, then its scores batched.
        ``last_chunk_s`` holds the chunk's wall seconds for indexing (encode and build) and for scoring."""
        t0 = time.perf_counter()
        self.prefill([r for spec, seg in work for r in self.plan(spec, seg)], batch_tokens=encode_tokens)
        primed = self.build_chunk(work)
        t1 = time.perf_counter()
        scores = self.score_many(list(zip(primed, (seg for _, seg in work), strict=True)), per_token=per_token,
                                 batch_tokens=score_tokens)
        self.last_chunk_s = {"index": t1 - t0, "score": time.perf_counter() - t1}
        return list(zip(primed, scores, strict=True))

    def forget(self) -> None:
        """Drop the sample's memoised encodes (call between samples, so caches are freed)."""
        self._memo.clear()

    # ------------------------------------------------------------ notebook conveniences

    def prime(self, document: str, *, surrogate: str | None = None, builder: str | None = None,
              rope_fix: str | None = None, position_offset: int = 0, **templates) -> tuple[PrimedCache, Segments]:
        """Build one cache for a text. With a surrogate and no builder: truncate_prefix + rerotate."""
        if builder is None:
            builder = "truncate_prefix" if surrogate else "full"
        if builder == "truncate_prefix" and rope_fix is None:
            rope_fix = "rerotate"
        fields = {"builder": builder, "rope_fix": rope_fix, "position_offset": position_offset,
                  "surrogate": "query" if surrogate else "none", **templates}
        if surrogate and builder != "truncate_suffix":
            fields.setdefault("prefix_template", "{surrogate}\n")
        if surrogate and builder == "truncate_suffix":
            fields.setdefault("suffix_template", "\n{surrogate}")
        spec = ConditionSpec.from_config("notebook", fields)
        validate(spec)
        seg = self.segments(spec, document=document, query="", answer="-", surrogate=surrogate)
        return self.build(spec, seg), seg

    def nll(self, primed: PrimedCache, *, query: str, answer: str,
            prompt_template: str = ConditionSpec.prompt_template,
            answer_template: str = ConditionSpec.answer_template, per_token: bool = False) -> Score:
        spec = replace(ConditionSpec(name="notebook"), prompt_template=prompt_template,
                       answer_template=answer_template)
        seg = self.segments(spec, document="", query=query, answer=answer)
        return self.score(primed, seg, per_token=per_token)
