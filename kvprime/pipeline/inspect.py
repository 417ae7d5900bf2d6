"""What exactly is in two conditions' caches for one sample: each condition's segments, cache length and RoPE
position ids, its NLL, and per layer the cosine similarity and max |difference| of the document's keys and values
between the first two (the notebook's cache-shape check and value-vector analysis).

The run records it for ``experiment.inspect`` (``inspect.json``); ``kvprime inspect`` prints it.
"""

from __future__ import annotations

import torch

from ..cache import hf_internals as hf


def document_span(primed, seg) -> tuple[int, int]:
    start = 0
    for name in primed.kept_segments:
        if name == "document":
            return start, start + len(seg.document)
        start += len(getattr(seg, name))
    raise ValueError("this cache keeps no document entries")


def compare_caches(a, seg_a, b, seg_b) -> list[dict]:
    """Per layer: cosine similarity and max |diff| of the document's keys and values in two caches."""
    (a0, a1), (b0, b1) = document_span(a, seg_a), document_span(b, seg_b)
    rows = []
    for i, (la, lb) in enumerate(zip(hf.cache_layers(a.cache), hf.cache_layers(b.cache), strict=True)):
        row: dict = {"layer": i}
        for kind, ta, tb in zip(("keys", "values"), la, lb, strict=True):
            x = ta[..., a0:a1, :].float().flatten()
            y = tb[..., b0:b1, :].float().flatten()
            row[f"{kind}_cos"] = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
            row[f"{kind}_max_abs_diff"] = float((x - y).abs().max())
        rows.append(row)
    return rows


def inspect_pair(session, sample, names) -> dict:
    """Build and score ``sample``'s caches under the named conditions (two or more; the first two are
    compared layer by layer) with the session's surrogates, segments and engine."""
    names = list(names)
    engine = session.engine
    texts, segs = session.surrogates(sample, names), session.segments(sample, names)
    out = {"sample_id": sample.sample_id, "conditions": {}}
    built = {}
    for name in names:
        spec, seg = session.specs[name], segs[name]
        primed = engine.build(spec, seg)
        built[name] = (primed, seg)
        out["conditions"][name] = {
            "surrogate": texts[name],
            "segments": {k: list(getattr(seg, k)) for k in ("sink", "prefix", "document", "suffix", "prompt",
                                                             "answer")},
            "kept_segments": list(primed.kept_segments),
            "cache_len": len(primed),
            "cache_position_ids": primed.position_ids,
            "next_position": primed.next_position,
            "nll": engine.score(primed, seg).nll,
        }
    (na, (pa, sa)), (nb, (pb, sb)) = list(built.items())[:2]
    out["same_document_ids"] = sa.document == sb.document
    # Entries of different documents (another document template) have nothing to line up against.
    out["layers"] = compare_caches(pa, sa, pb, sb) if out["same_document_ids"] else []
    return out
