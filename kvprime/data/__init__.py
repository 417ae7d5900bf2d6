"""Datasets for kvprime: a registry of loaders and `load_samples`, which checks and selects.

A loader is a function `cfg -> iterable of Sample | Rejection` registered by name, with the `dataset` options it
reads (``kvprime.data.registry``); every module of this package is imported when the registry is first read, so
a loader module registers itself with no list kept by hand. A loader only translates its source, naming each
record's place in it (``Sample.origin``); the checks (unknown keys, empty fields, word-count filters), the
id-uniqueness rule and the selection live here so that every source is treated the same way. File loaders read through
``kvprime.data.reading``: UTF-8 with or without a byte-order mark, every problem named by file, line and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kvprime.data.registry import LOADERS, OPTIONS, REGISTRY, Loader, register_loader
from kvprime.data.types import LoadResult, Rejection, Sample

from ..config import compose, settings
from ..errors import ConfigError, DataError
from . import distractors
from .passages import select_grouped

__all__ = ["LOADERS", "OPTIONS", "Loader", "LoadResult", "Rejection", "Sample", "load_samples", "register_loader"]

FILTER_KEYS = ("min_passage_words", "max_passage_words", "min_answer_words", "max_answer_words")
SELECTIONS = ("first", "random")


def check_keys(cfg: Mapping) -> None:
    """Refuse every `dataset` key that neither kvprime nor the selected (registered) loader reads."""
    found = compose.dataset_keys(cfg, OPTIONS)
    assert found is not None  # called once REGISTRY.get has accepted the loader's name
    accepted, place = found
    compose.refuse(compose.unknown_keys("dataset", cfg, accepted, settings.show, place))


def _limits(filters) -> dict:
    filters = dict(filters or {})
    unknown = sorted(set(filters) - set(FILTER_KEYS))
    if unknown:
        # A misspelt filter would otherwise silently filter nothing.
        raise ConfigError(f"Unknown dataset filter(s) {unknown}; valid filters: {', '.join(FILTER_KEYS)}.")
    for key, value in filters.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"dataset.filters.{key} must be a non-negative integer or null, got {value!r}.")
    return {k: filters.get(k) for k in FILTER_KEYS}


def _check(sample: Sample, limits: Mapping) -> str | None:
    """The first reason `sample` is unusable, or None."""
    for field in ("passage", "query", "answer"):
        if not getattr(sample, field).strip():
            return f"empty {field}"
    for field in ("passage", "answer"):
        n = len(getattr(sample, field).split())
        lo, hi = limits[f"min_{field}_words"], limits[f"max_{field}_words"]
        if lo is not None and n < lo:
            return f"{field} has {n} words (< min_{field}_words={lo})"
        if hi is not None and n > hi:
            return f"{field} has {n} words (> max_{field}_words={hi})"
    return None


def _select(candidates: list[Sample], n, selection: str, seed) -> list[Sample]:
    if n is None or n >= len(candidates):
        return list(candidates)
    if selection == "first":
        return candidates[:n]
    # Indices sorted back into source order: same seed, same samples, readable run order.
    idx = np.sort(np.random.default_rng(seed).choice(len(candidates), size=n, replace=False))
    return [candidates[i] for i in idx]


def _duplicate(sample_id: str, name: str, first: str, again: str) -> DataError:
    return DataError(f"Duplicate sample_id {sample_id!r} in dataset {name!r}: {first} and {again} both give it. "
                     "Sample ids must be unique (scores, resumes and merges are keyed on them): give one of the two "
                     "records another id, or remove the repeated record.")


def load_samples(cfg: Mapping, multidoc: Mapping | None = None) -> LoadResult:
    """Load, check and select samples as `cfg` (a plain mapping, e.g. the `dataset` config) says.

    Common keys: `name` (loader), `n_samples` (int or null = all), `selection` ("first" or
    "random"), `seed` (int, used by "random"), `filters` (word-count limits, null = no limit).
    Every other key must be an option the loader declares (``register_loader(name, options=...)``). ``multidoc``
    (the run's checked ``multidoc`` settings) gives each selected sample k passages: the gold among distractors
    (``kvprime.data.distractors``), drawn from `seed`.
    """
    cfg = dict(cfg)
    name: Any = cfg.get("name")  # any value: REGISTRY.get refuses what is not a registered loader's name
    loader = REGISTRY.get(name)
    check_keys(cfg)  # here too: a plugin's loader is registered only once the run's plugins are imported
    # The same rule and paragraph as a run's settings check (kvprime.config.settings), for callers that bypass it.
    n = settings.check_value("dataset.n_samples", cfg.get("n_samples"))
    selection = cfg.get("selection") or "first"
    if selection not in SELECTIONS:
        raise ConfigError(f"Unknown dataset.selection {selection!r}; valid: {', '.join(SELECTIONS)}.")
    seed = settings.check_value("dataset.seed", cfg.get("seed"))
    if selection == "random" and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"dataset.selection=random needs an integer dataset.seed, got {seed!r}.")
    limits = _limits(cfg.get("filters"))

    candidates: list[Sample] = []
    rejected: list[dict] = []
    seen: dict[str, str] = {}  # sample_id -> where its record is
    n_records = 0
    for n_records, record in enumerate(loader.load(cfg), start=1):
        if isinstance(record, Rejection):
            rejected.append(record.to_dict())
            continue
        reason = _check(record, limits)
        if reason is not None:
            rejected.append(Rejection(record.sample_id, reason).to_dict())
            continue
        # Checked before selection so that whether a duplicate is caught does not depend on the seed.
        origin = record.origin or f"record {n_records} of loader {name!r}"
        if record.sample_id in seen:
            raise _duplicate(record.sample_id, name, seen[record.sample_id], origin)
        seen[record.sample_id] = origin
        candidates.append(record)
    if n_records == 0:
        path = f" (dataset.path={cfg['path']})" if cfg.get("path") is not None else ""
        raise DataError(f"dataset {name!r}{path} gave no record at all: the source is empty. Point dataset.path at "
                        f"a file that holds samples, or choose another dataset.name ({', '.join(REGISTRY.names())}).")
    grouped = settings.check_value("dataset.group_by_passage", cfg.get("group_by_passage", False))
    pool = None
    if multidoc is not None and multidoc["k"] > 1:
        if grouped:
            raise ConfigError(f"dataset.group_by_passage=true serves one passage's cache to all of its questions, "
                              f"but multidoc.k={multidoc['k']} gives each question its own distractors, so no cache "
                              f"would be shared; use one of the two (multidoc.k=1, or group_by_passage=false).")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"multidoc.k={multidoc['k']} draws distractors and gold slots from dataset.seed, which "
                              f"must then be an integer; got {seed!r}.")
        multidoc = {**multidoc, "seed": seed}
        candidates, unfit, pool = distractors.eligible(candidates, multidoc)
        rejected += unfit
    if grouped:
        selected, single = select_grouped(candidates, n, selection, seed)
        rejected = rejected + single
    else:
        selected = _select(candidates, n, selection, seed)
    if pool is not None and multidoc is not None:
        selected = distractors.attach(selected, pool, multidoc)
    return LoadResult(
        samples=selected,
        rejected=rejected,
        n_candidates=len(candidates),
    )
