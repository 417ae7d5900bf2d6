"""Answer negative log-likelihood given a primed cache and a prompt.

One forward pass over prompt+answer reads the cache. The logit at prompt position ``prompt_len - 1``
predicts the first answer token, so positions ``prompt_len-1 .. prompt_len+answer_len-2`` score every
answer token (the walkthrough notebook dropped the first). Only those ``answer_len`` positions reach the
LM head. The pass appends to the cache; the cache is cropped back to its length afterwards, so the same
cache serves the next condition without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DataError
from . import batch_caches
from . import hf_internals as hf


@dataclass
class Score:
    nll: float  # mean natural-log loss per answer token: the headline number
    nll_sum: float
    n_answer_tokens: int
    token_logprobs: list[float] | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.nll)


def score_answer(model, primed, prompt_ids, answer_ids, *, per_token: bool = False) -> Score:
    if not answer_ids:
        raise DataError("the answer has no tokens; there is nothing to score")
    if not prompt_ids:
        raise DataError("the prompt has no tokens; the first answer token would have no logit to predict it")
    if primed.masked:  # entries scoring must not see: the batched path carries an attention mask
        return score_batch(model, [(primed, prompt_ids, answer_ids)], per_token=per_token)[0]
    ids = list(prompt_ids) + list(answer_ids)
    device = hf.cache_device(primed.cache)
    input_ids = torch.tensor([ids], device=device)
    start = primed.next_position
    position_ids = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    length = hf.cache_length(primed.cache)
    try:
        logits = hf.logits_after(model, primed.cache, input_ids, position_ids, keep_last=len(answer_ids) + 1)
    finally:
        hf.crop_to(primed.cache, length)
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    target = torch.tensor(answer_ids, device=logprobs.device)
    token_lp = logprobs.gather(-1, target[:, None])[:, 0]
    nll_sum = float(-token_lp.sum())
    return Score(
        nll=nll_sum / len(answer_ids),
        nll_sum=nll_sum,
        n_answer_tokens=len(answer_ids),
        token_logprobs=[float(x) for x in token_lp] if per_token else None,
    )


def score_batch(model, items, *, per_token: bool = False, from_spans: bool = True) -> list[Score]:
    """Score several (primed cache, prompt ids, answer ids) in one forward pass.

    The caches are stacked into one right-padded batch cache (pads, and entries a cache marks as not to be
    attended, masked out) and the prompt+answer rows are
    left-padded, so every row's answer ends at the last position and only the last max(answer)+1 positions
    reach the LM head. Each row keeps its own position ids, so every number equals the one-at-a-time path up
    to float rounding. The primed caches themselves are not touched. ``from_spans``: how the caches are stacked
    (``batch_caches.stack_caches``; the same numbers either way)."""
    for _primed, prompt, answer in items:
        if not answer or not prompt:
            return [score_answer(model, p, pr, an, per_token=per_token) for p, pr, an in items]
    cache, cache_mask, input_ids, input_mask, position_ids = stack_rows(
        model, [(p, list(pr) + list(an)) for p, pr, an in items], from_spans=from_spans)
    keep = max(len(an) for _, _, an in items) + 1
    logits = hf.logits_batch(model, cache, cache_mask, input_ids, input_mask, position_ids, keep_last=keep)
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    out = []
    for r, (_, _, answer) in enumerate(items):
        n = len(answer)
        target = torch.tensor(answer, device=logprobs.device)
        token_lp = logprobs[r, keep - 1 - n:].gather(-1, target[:, None])[:, 0]
        nll_sum = float(-token_lp.sum())
        out.append(Score(nll=nll_sum / n, nll_sum=nll_sum, n_answer_tokens=n,
                         token_logprobs=[float(x) for x in token_lp] if per_token else None))
    return out


def stack_rows(model, items, *, from_spans: bool = True):
    """The batch inputs of (primed cache, token ids) rows read against their caches: a right-padded copy of the
    caches stacked, its 0/1 mask (pads and entries a cache marks as not to be attended are 0), the ids left-padded
    so that every row ends in the last column, their mask, and each row's own position ids continuing from its
    ``next_position``. Shared by scoring and answer decoding (``kvprime.cache.answers``), so both read a cache
    the same way."""
    cache, cache_mask = batch_caches.stack_caches(model, [p.cache for p, _ in items], from_spans=from_spans)
    device = cache_mask.device
    for r, (p, _) in enumerate(items):  # right-padded: row r's entries are its first len(p) columns
        if p.attend is not None:
            cache_mask[r, :len(p)] = torch.tensor([int(a) for a in p.attend], device=device)
    rows = [list(ids) for _, ids in items]
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    input_ids = torch.tensor([[0] * k + r for k, r in zip(pad, rows, strict=True)], device=device)
    input_mask = torch.tensor([[0] * k + [1] * len(r) for k, r in zip(pad, rows, strict=True)], device=device)
    position_ids = torch.stack([
        torch.arange(p.next_position - k, p.next_position - k + width, device=device)
        for (p, _), k in zip(items, pad, strict=True)]).clamp_min(0)
    return cache, cache_mask, input_ids, input_mask, position_ids


def score_without_cache(model, ids, n_answer: int) -> float:
    """Mean NLL of the last ``n_answer`` ids from one plain forward pass: the reference for tests."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(ids)], device=device)
    positions = torch.arange(len(ids), device=device).unsqueeze(0)
    logits = hf.logits_after(model, None, input_ids, positions, keep_last=n_answer + 1)
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    target = torch.tensor(list(ids[-n_answer:]), device=device)
    return float(-logprobs.gather(-1, target[:, None]).mean())
