"""Greedy decoding of an answer from a primed cache and a condition's prompt (the ``answer`` metric).

The cache is read exactly as the scorer reads it (``kvprime.cache.scoring.stack_rows``, shared): the rows' caches
are stacked right-padded with pads and the entries a cache marks as not to be attended masked out, the prompts are
left-padded so that every row's next token lands in the same column, and each row keeps its own position ids
(continuing from ``next_position``). The stack is a copy, so the primed caches that other conditions and the
scorer share are never touched; each decode step appends one column to the copy.

A row stops at the first generated token whose text holds a newline after some text (the answer is one line:
its first non-blank one), at an end-of-sequence or end-of-turn token, or after ``max_new_tokens``. Newlines
before any text do not end it: small models often open an answer with a line break (SmolLM2-135M after
"Answer:" does for about a third of SQuAD questions), which would otherwise score as an empty answer.
Greedy decoding is argmax over the logits, as ``model.generate(do_sample=False)`` does, so batched rows give
one-at-a-time tokens up to float rounding (a rounding-level near-tie could in principle flip one token).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import DataError
from . import hf_internals as hf
from .decoding import stop_ids
from .scoring import stack_rows

STOPS = ("newline", "eos", "max_new_tokens", "window")


@dataclass(frozen=True)
class Decoded:
    token_ids: tuple[int, ...]  # every generated token, the stopping one included (its text may end the answer)
    stop: str  # one of STOPS; "window": a sliding-window model's window ended the row before max_new_tokens
    text: str = ""  # the answer: the first non-blank line of the decoded text, stripped

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@lru_cache(maxsize=8)
def _newline_ids(tokenizer) -> frozenset[int]:
    # Any token whose text holds a newline, so "Paris.\n" and a bare "\n" both end the line (byte-level BPE and
    # SentencePiece byte tokens alike decode a 0x0A byte to "\n").
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, t in enumerate(texts) if "\n" in t)


def stop_rules(model, tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """(newline token ids, end token ids) of a model and its tokenizer."""
    return _newline_ids(tokenizer), frozenset(stop_ids(model, tokenizer))


def answer_text(tokenizer, token_ids) -> str:
    """The generated answer: the first non-blank line of the decoded tokens, stripped."""
    return _decode(tokenizer, token_ids).strip().split("\n", 1)[0].strip()


def _decode(tokenizer, token_ids) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


@torch.inference_mode()
def decode_batch(model, items, *, max_new_tokens: int, newline: frozenset[int] = frozenset(),
                 end: frozenset[int] = frozenset(), window: int | None = None, text_of=None) -> list[Decoded]:
    """Greedy answers of several (primed cache, prompt ids) in one left-aligned batch; ``Decoded.text`` empty
    (``answer_text`` fills it, given a tokenizer). ``window``: the smallest sliding window of the model, whose
    layers mask by column: a row stops (``stop="window"``) before its columns would cross it. ``text_of``: the
    text of a row's tokens, to let a newline token end the row only after some text (None: any newline token)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: at least one token is decoded")
    if any(not prompt for _, prompt in items):
        raise DataError("the prompt has no tokens; the first answer token would have no logit to predict it")
    cache, cache_mask, input_ids, input_mask, positions = stack_rows(model, items)
    device = cache_mask.device
    mask = torch.cat([cache_mask, input_mask], dim=1)
    steps = max_new_tokens
    if window is not None:  # the last step's forward holds mask.shape[1] + steps - 1 columns; all must stay < window
        steps = max(1, min(steps, window - mask.shape[1]))
    logits, cache = hf.step(model, input_ids, cache=cache, attention_mask=mask, position_ids=positions, keep_last=1)
    positions = positions[:, -1:]
    stop_t = torch.tensor(sorted(end), dtype=torch.long, device=device)
    line_t = torch.tensor(sorted(newline), dtype=torch.long, device=device)
    n = len(items)
    out: list[list[int]] = [[] for _ in range(n)]
    why: list[str | None] = [None] * n
    for t in range(steps):
        token = logits[:, -1, :].argmax(-1)
        at_end, at_line = torch.isin(token, stop_t), torch.isin(token, line_t)
        for r, (tok, e, nl) in enumerate(zip(token.tolist(), at_end.tolist(), at_line.tolist(), strict=True)):
            if why[r] is not None:
                continue
            if e:
                why[r] = "eos"  # not kept: an end token carries no answer text
                continue
            out[r].append(tok)
            if nl and (text_of is None or "\n" in text_of(out[r]).lstrip()):
                why[r] = "newline"
        if all(w is not None for w in why) or t == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        logits, cache = hf.step(model, token[:, None], cache=cache, attention_mask=mask, position_ids=positions,
                                keep_last=1)
    limit = "max_new_tokens" if steps == max_new_tokens else "window"
    return [Decoded(tuple(toks), w or limit) for toks, w in zip(out, why, strict=True)]


def decode_many(model, tokenizer, items, *, max_new_tokens: int, batch_tokens: int = 4096,
                windows=()) -> list[Decoded]:
    """Answers of several (primed cache, prompt ids), in input order, batched by cache length within
    ``batch_tokens`` cache tokens (as ``Engine.score_many`` batches scoring). ``windows``: the model's sliding
    windows; a batch's padded cache, prompt and decoded columns then stay inside the smallest."""
    newline, end = stop_rules(model, tokenizer)
    window = min(windows) if windows else None
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out: list[Decoded | None] = [None] * len(items)
    group: list[int] = []
    longest = 0

    def flush():
        decoded = decode_batch(model, [items[j] for j in group], max_new_tokens=max_new_tokens, newline=newline,
                               end=end, window=window, text_of=lambda ids: _decode(tokenizer, ids))
        for j, d in zip(group, decoded, strict=True):
            out[j] = Decoded(d.token_ids, d.stop, answer_text(tokenizer, d.token_ids))

    for i in order:
        width, row = len(items[i][0]), len(items[i][1])
        too_wide = window is not None and width + max(longest, row) + max_new_tokens > window
        if group and ((len(group) + 1) * width > batch_tokens or too_wide):
            flush()
            group, longest = [], 0
        group.append(i)
        longest = max(longest, row)
    if group:
        flush()
    done = [d for d in out if d is not None]
    assert len(done) == len(out)  # every item is in exactly one flushed group
    return done
