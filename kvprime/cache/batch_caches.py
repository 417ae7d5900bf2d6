"""Batches of caches: many caches stacked into one padded batch cache (scoring, answer decoding, generation), and
many pasts continued in one forward (prefix extension).

A right-padded stack is built from the caches' spans: an unassembled ``hf_internals.AssembledCache`` contributes its
parts, any other cache itself. Per layer that is one concatenation of every span, one rotation of the moved spans'
keys (``rotate_keys`` with one delta per column) and one indexed copy into the batch, however many caches: assembling
each cache and then copying it into its row costs several tensor operations per cache and layer, the per-cache host
work (kernel launches) that bounds a small model on a GPU. Both ways give the same tensors bit for bit
(``tests/test_stacked_spans.py``); ``from_spans=False`` takes the per-cache way, so that ``kvprime bench`` can time
both side by side. Caches are read only through ``hf_internals``.
"""

from __future__ import annotations

import torch

from . import hf_internals as hf


def stack_caches(model, caches: list, side: str = "right", *,
                 from_spans: bool = True) -> tuple[hf.DynamicCache, torch.Tensor]:
    """One batch cache from caches of different lengths, padded with zeros on ``side``, and its 0/1 mask.

    Right padding serves scoring (rows read from position 0); left padding serves decoding, where every row's
    next token must land in the same column. Right-padded stacks on models without sliding-window layers are
    built from the caches' spans (``_stack_spans``) unless ``from_spans`` is False: then each cache is assembled
    alone and copied into its row, the way ``kvprime bench`` times beside it (same tensors)."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}; accepted: right, left")
    lengths = [hf.cache_length(c) for c in caches]
    width = max(lengths)
    if side == "right" and from_spans and not any(hf.sliding_windows(model)):
        layers = _stack_spans(caches, width)
    else:
        per_cache = [hf.cache_layers(c) for c in caches]  # assembles an unassembled cache
        layers = []
        for i, (k0, v0) in enumerate(per_cache[0]):
            keys = k0.new_zeros((len(caches), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(caches), v0.shape[1], width, v0.shape[3]))
            for r, c_layers in enumerate(per_cache):
                cols = slice(0, lengths[r]) if side == "right" else slice(width - lengths[r], width)
                keys[r, :, cols] = c_layers[i][0][0]
                values[r, :, cols] = c_layers[i][1][0]
            layers.append((keys, values))
    device = layers[0][0].device
    real = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    mask = (real if side == "right" else real.flip(-1)).long()
    return hf.cache_from_layers(model, layers), mask


def _stack_spans(caches: list, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The right-padded per-layer (keys, values) of ``caches`` built from their spans: per layer one
    concatenation, one rotation of the moved keys and one indexed copy (module docstring). Only moved keys are
    rotated, each column by its span's delta, so every other key is copied untouched, as assembling each cache
    alone leaves it."""
    spans: list[tuple] = []  # (source cache, start, stop)
    rows: list[int] = []
    cols: list[int] = []
    deltas: list[int] = []
    spec: hf.RopeSpec | None = None
    for r, c in enumerate(caches):
        unassembled = isinstance(c, hf.AssembledCache) and c.unassembled
        parts = c.spans if unassembled else [(c, 0, hf.cache_length(c), 0)]
        if unassembled and c.spans_rope is not None:
            spec = c.spans_rope
        at = 0
        for src, start, stop, delta in parts:
            spans.append((src, start, stop))
            rows += [r] * (stop - start)
            cols += range(at, at + stop - start)
            deltas += [delta] * (stop - start)
            at += stop - start
    sources = {id(src): hf.cache_layers(src) for src, _, _ in spans}  # per source, its (keys, values) per layer
    device = next(iter(sources.values()))[0][0].device
    row_idx, col_idx = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    moved = [j for j, d in enumerate(deltas) if d]
    moved_idx = torch.tensor(moved, device=device) if moved else None
    moved_delta = torch.tensor([deltas[j] for j in moved], dtype=torch.float32, device=device) if moved else None
    layers = []
    for i in range(len(next(iter(sources.values())))):
        # [kv_heads, columns, dim]: one slice (a view) per span, one copy per layer
        k = torch.cat([sources[id(src)][i][0][:, :, a:b] for src, a, b in spans], dim=2)[0]
        v = torch.cat([sources[id(src)][i][1][:, :, a:b] for src, a, b in spans], dim=2)[0]
        if moved_idx is not None and moved_delta is not None:
            assert spec is not None  # only an AssembledCache's spans move, and it carries its RoPE spec
            k[:, moved_idx] = hf.rotate_keys(k[:, moved_idx], moved_delta, spec.layers[i].inv_freq)
        keys = k.new_zeros((len(caches), k.shape[0], width, k.shape[-1]))
        values = v.new_zeros((len(caches), v.shape[0], width, v.shape[-1]))
        keys[row_idx, :, col_idx] = k.transpose(0, 1)
        values[row_idx, :, col_idx] = v.transpose(0, 1)
        layers.append((keys, values))
    return layers


@torch.inference_mode()
def extend_batch(model, pasts: list, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 lengths: list[int], *, from_spans: bool = True) -> list:
    """Continue each row's past cache with its right-padded new ids: one cache per row holding exactly its
    past's entries then its ``lengths[r]`` new ones (new tensors: the pasts stay as they were).

    The pasts are stacked right-padded (``stack_caches``) and their pads masked, so a new token attends to its
    own row's past and to the real new tokens before it, as an unpadded continuation does (up to float
    rounding). Only for models without sliding-window layers: there the padded width could push a row's own
    entries out of its window. ``from_spans``: as in ``stack_caches``."""
    past = [hf.cache_length(c) for c in pasts]
    cache, past_mask = stack_caches(model, pasts, from_spans=from_spans)
    width = past_mask.shape[1]
    new_mask = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
                < torch.tensor(lengths, device=input_ids.device)[:, None]).long()
    hf.call(model.base_model, cache, input_ids=input_ids, position_ids=position_ids,
            attention_mask=torch.cat([past_mask, new_mask], dim=1), use_cache=True)
    return [hf.cache_from_layers(model, [
        (torch.cat([k[r:r + 1, :, :p], k[r:r + 1, :, width:width + n]], dim=-2),
         torch.cat([v[r:r + 1, :, :p], v[r:r + 1, :, width:width + n]], dim=-2))
        for k, v in hf.cache_layers(cache)]) for r, (p, n) in enumerate(zip(past, lengths, strict=True))]
