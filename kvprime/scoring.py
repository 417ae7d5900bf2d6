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
        raise ValueError("the answer has no tokens; there is nothing to score")
    if not prompt_ids:
        raise ValueError("the prompt has no tokens; the first answer token would have no logit to predict it")
    ids = list(prompt_ids) + list(answer_ids)
    device = primed.cache.layers[0].keys.device
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


def score_without_cache(model, ids, n_answer: int) -> float:
    """Mean NLL of the last ``n_answer`` ids from one plain forward pass: the reference for tests."""
    input_ids = torch.tensor([list(ids)])
    positions = torch.arange(len(ids)).unsqueeze(0)
    logits = hf.logits_after(model, None, input_ids, positions, keep_last=n_answer + 1)
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    target = torch.tensor(list(ids[-n_answer:]))
    return float(-logprobs.gather(-1, target[:, None]).mean())
