"""Selective recompute of an assembled cache (CacheBlend's blended attention, EPIC's static set), on tensors.

A ``BlendJob`` is one sample: its assembled cache's per-layer keys and values (the stale entries), the cache's
token ids and RoPE positions, and the rows ``rows`` to recompute (S). ``recompute_batch`` runs every job of a
batch in ONE forward of the decoder over the S tokens only: their embeddings at their positions, the past being
each job's cache without S's rows, under an exact 4-D mask: a recomputed token sees the stale entries at earlier
positions that are not in S, the fresh S entries at earlier positions, and itself (causal by position, never
the bottom-right alignment of CacheBlend's and LMCache's kernels). Every layer's fresh S keys and values are
then written over S's rows of a copy of the stale cache; rows outside S are kept as they are.

``deviation_scores`` is CacheBlend's selection pass: the jobs' whole caches encoded with full attention through
layers 0..``layer`` (stopped there), and each row's squared L2 distance between its fresh post-RoPE key at
``layer`` and its stale key, summed over kv heads and head dims (LMCache's distance).

Rows are positions in order (row r of a job is the token at ``positions[r]``), so a row's exact causal past is
every row whose position is not later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hf_internals as hf


@dataclass(frozen=True)
class BlendJob:
    layers: list  # [(keys, values)] per layer, [1, kv_heads, N, head_dim]: the assembled cache's entries
    ids: tuple[int, ...]  # N token ids
    positions: tuple[int, ...]  # N RoPE positions, increasing
    rows: tuple[int, ...] = ()  # S: the rows to recompute, increasing

    def key_pairs(self) -> int:
        """(query, key) pairs one layer of the recompute attends: each S row reads every row up to its own."""
        return sum(r + 1 for r in self.rows)


def _check_window(model, jobs) -> None:
    windows = [w for w in hf.sliding_windows(model) if w is not None]
    span = max(j.positions[-1] - j.positions[0] + 1 for j in jobs)
    # Inside the smallest window every key is visible to every later query, so one causal mask is exact on
    # sliding and full layers alike (the engine refuses longer samples on such models before building).
    if windows and span >= min(windows):
        raise ValueError(f"a cache of {span} positions crosses the sliding window of {min(windows)}: the blended "
                         "mask would not be the model's")


def _padded_stale(job: BlendJob, keep: torch.Tensor, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The job's kept (not recomputed) rows of every layer, zero-padded to ``width`` rows."""
    out = []
    for k, v in job.layers:
        ku, vu = k[..., keep, :], v[..., keep, :]
        pad = width - ku.shape[-2]
        if pad:
            ku = torch.cat([ku, ku.new_zeros(*ku.shape[:-2], pad, ku.shape[-1])], dim=-2)
            vu = torch.cat([vu, vu.new_zeros(*vu.shape[:-2], pad, vu.shape[-1])], dim=-2)
        out.append((ku, vu))
    return out


def _mask(pos_kept, pos_new, width_kept: int, width_new: int, device) -> torch.Tensor:
    """[1, 1, width_new, width_kept + width_new]: new row t may read kept row u iff p_u <= p_t, and new row s iff
    p_s <= p_t; padding rows read only themselves (so no row is empty), padding columns are read by none."""
    allowed = torch.zeros(1, 1, width_new, width_kept + width_new, dtype=torch.bool, device=device)
    pt = torch.tensor(pos_new, device=device)
    if len(pos_kept):
        allowed[0, 0, :len(pos_new), :len(pos_kept)] = torch.tensor(pos_kept, device=device)[None, :] <= pt[:, None]
    allowed[0, 0, :len(pos_new), width_kept:width_kept + len(pos_new)] = pt[None, :] <= pt[:, None]
    for m in range(len(pos_new), width_new):
        allowed[0, 0, m, width_kept + m] = True
    return allowed


def recompute_batch(model, jobs: list[BlendJob]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each job's cache layers with its S rows recomputed (module docstring), all jobs in one forward. A job with
    no rows gets its own layers back (the same tensors, no forward)."""
    todo = [j for j in jobs if j.rows]
    if not todo:
        return [j.layers for j in jobs]
    _check_window(model, todo)
    device = todo[0].layers[0][0].device
    keeps = []
    for j in todo:
        kept = torch.ones(len(j.ids), dtype=torch.bool)
        kept[list(j.rows)] = False
        keeps.append(kept.nonzero().flatten().tolist())
    width_kept, width_new = max(len(k) for k in keeps), max(len(j.rows) for j in todo)
    stale = [_padded_stale(j, torch.tensor(k, dtype=torch.long, device=device), width_kept)
             for j, k in zip(todo, keeps, strict=True)]
    past = hf.cache_from_layers(model, [(torch.cat([s[i][0] for s in stale]), torch.cat([s[i][1] for s in stale]))
                                        for i in range(len(stale[0]))])
    ids, pos, masks = [], [], []
    for j, keep in zip(todo, keeps, strict=True):
        p_new = [j.positions[r] for r in j.rows]
        pad = width_new - len(j.rows)
        ids.append([j.ids[r] for r in j.rows] + [0] * pad)
        pos.append(p_new + list(range(p_new[-1] + 1, p_new[-1] + 1 + pad)))
        masks.append(_mask([j.positions[u] for u in keep], p_new, width_kept, width_new, device))
    hf.masked_extend(model, past, torch.tensor(ids, device=device), torch.tensor(pos, device=device),
                     torch.cat(masks))
    fresh = [(k[..., -width_new:, :], v[..., -width_new:, :]) for k, v in hf.cache_layers(past)]
    out, at = [], 0
    for j in jobs:
        if not j.rows:
            out.append(j.layers)
            continue
        out.append(_write_rows(j, [(k[at:at + 1, :, :len(j.rows)], v[at:at + 1, :, :len(j.rows)]) for k, v in fresh]))
        at += 1
    return out


def _write_rows(job: BlendJob, fresh) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rows = torch.tensor(job.rows, dtype=torch.long, device=job.layers[0][0].device)
    out = []
    for (k, v), (fk, fv) in zip(job.layers, fresh, strict=True):
        k, v = k.clone(), v.clone()
        k[..., rows, :], v[..., rows, :] = fk.to(k.dtype), fv.to(v.dtype)
        out.append((k, v))
    return out


def deviation_scores(model, jobs: list[BlendJob], layer: int) -> list[torch.Tensor]:
    """Per job, each row's squared L2 distance at ``layer`` between the key of a full-attention encode of the
    whole cache (run through layers 0..``layer`` only) and the stale key, summed over kv heads and head dims."""
    _check_window(model, jobs)
    device = jobs[0].layers[0][0].device
    width = max(len(j.ids) for j in jobs)
    ids = torch.tensor([list(j.ids) + [0] * (width - len(j.ids)) for j in jobs], device=device)
    pos = torch.tensor([list(j.positions) + list(range(j.positions[-1] + 1, j.positions[-1] + 1 + width - len(j.ids)))
                        for j in jobs], device=device)
    cache = hf.encode_layers(model, ids, pos, [len(j.ids) for j in jobs], layer)
    fresh = hf.cache_layers(cache, upto=layer)[layer][0]  # the layers after it were not run
    out = []
    for b, j in enumerate(jobs):
        stale = j.layers[layer][0][0].float()
        out.append(((fresh[b, :, :len(j.ids)].float() - stale) ** 2).sum(dim=(0, 2)).cpu())
    return out
