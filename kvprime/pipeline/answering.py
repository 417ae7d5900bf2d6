"""The ``answer`` metric's step of a scoring chunk: decode each (sample, condition)'s answer from the cache the
chunk built and scored, and the fields its score line gets (``kvprime.analysis.answer_quality``)."""

from __future__ import annotations

import time

from ..analysis import answer_quality
from ..cache import answers


def answer_fields(engine, work, done, *, max_new_tokens: int, batch_tokens: int) -> list[dict]:
    """One dict per (sample, condition, segments) of ``work``, in order; ``done`` holds their (primed cache, score).
    ``answer_s`` is the row's share of the chunk's decoding seconds, in proportion to the tokens it ran."""
    t = time.perf_counter()
    decoded = answers.decode_many(engine.model, engine.tokenizer,
                                  [(pc, seg.prompt) for (_, _, seg), (pc, _) in zip(work, done, strict=True)],
                                  max_new_tokens=max_new_tokens, batch_tokens=batch_tokens, windows=engine.windows)
    seconds = time.perf_counter() - t
    ran = [len(seg.prompt) + d.n_tokens for (_, _, seg), d in zip(work, decoded, strict=True)]
    out = []
    for (sample, _, _), d, n in zip(work, decoded, ran, strict=True):
        references = sample.answers or (sample.answer,)
        out.append({**answer_quality.score_fields(d.text, references), "generated_answer_tokens": d.n_tokens,
                    "answer_stop": d.stop, "answer_s": round(seconds * n / (sum(ran) or 1), 6)})
    return out
