"""How a run's selection is cut: the scoring chunks (``batch.samples`` consecutive samples, or one passage each)
and this job's shard of them.

No model and no torch: ``kvprime merge`` applies the same split to check that the shards it joins are one run's.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..data.passages import chunks as by_passage
from ..errors import RunError


def shard(samples: list, run_cfg: Mapping, chunk: int = 1, *, grouped: bool = False) -> list:
    """This job's deterministic slice of the selection: whole chunks of ``chunk`` consecutive samples, dealt
    round-robin. Dealing the scoring chunks (``batch.samples``) whole means a shard batches exactly the samples
    the unsharded run batches together, so merged shards equal the unsharded run bit for bit. ``grouped``
    (``dataset.group_by_passage``): the chunks are whole passages (``chunks``)."""
    n, i = int(run_cfg.get("num_shards", 1)), int(run_cfg.get("shard", 0))
    if n < 1 or not 0 <= i < n:
        raise RunError(f"run.shard={i} with run.num_shards={n}: the shard must be in 0..num_shards-1 and "
                       "num_shards >= 1.")
    return [s for group in chunks(samples, chunk, grouped=grouped)[i::n] for s in group]


def chunks(samples: list, chunk: int = 1, *, grouped: bool = False) -> list[list]:
    """The scoring chunks: ``chunk`` consecutive samples, or with ``grouped`` one passage each (its questions
    share the chunk's memoised encodes: kvprime.data.passages)."""
    if grouped:
        return by_passage(samples)
    chunk = max(1, int(chunk))
    return [samples[k:k + chunk] for k in range(0, len(samples), chunk)]


def grouped(cfg: Mapping) -> bool:
    """``dataset.group_by_passage`` of a run config (False when absent: runs before the setting existed)."""
    return bool((cfg.get("dataset") or {}).get("group_by_passage", False))


def chunk_size(cfg: Mapping) -> int:
    """``batch.samples`` of a resolved config (``batching.resolve``; a run's config.json holds numbers)."""
    return int(cfg["batch"]["samples"])
