"""What an experiment tracker is to kvprime: a name in ``TRACKERS`` and an object that can say, before any model
loads, whether its library is installed (``require``), and log a finished run's record (``log``), as a child of a
sweep's parent run when the run is a multirun job.

A tracker is one module of this package that registers itself (``@register_tracker("name")``), one option in
``conf/tracking/`` and its name in ``kvprime.config.schema.TRACKERS``; the record it logs is the same for every
tracker (``kvprime.tracking.record``)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError, UnavailableError
from ..registry import Registry
from .record import RunRecord


class TrackingError(UnavailableError):
    """The run finished and its directory is complete, but the tracker could not log it."""


@dataclass(frozen=True)
class Where:
    """Where a run is logged: the tracker's store and experiment (resolved from the run's tracking settings)."""

    tracking_uri: str
    experiment_name: str


class Tracker(Protocol):
    """One experiment tracker. ``require`` raises ``ConfigError`` (naming the extra to install) when its library is
    missing; ``log`` logs ``record`` and returns the tracker's id of the run. ``parent``: the sweep's parent run id,
    or None for a run of its own; ``parent_of`` makes a sweep's parent run and returns its id."""

    extra: str

    def require(self) -> None: ...

    def log(self, record: RunRecord, where: Where, parent: str | None) -> str: ...

    def parent_of(self, sweep_dir: Path, where: Where) -> str: ...


TRACKERS: Registry[Tracker] = Registry("tracker", packages=("kvprime.tracking",),
                                       hint="A tracker is a module of kvprime.tracking (or a plugin) that calls "
                                            "register_tracker(name).")


def register_tracker(name: str):
    """Class decorator: register an instance of the tracker class under ``name``."""

    def wrap(cls):
        TRACKERS.register(name, cls(), origin=cls)
        return cls

    return wrap


def missing_extra(module: str, extra: str) -> ConfigError | None:
    """The paragraph for tracking=<extra> when ``module`` cannot be imported, or None when it can (imported here, so
    that a broken installation stops the run before any model loads too, not only a missing one)."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        return ConfigError(f"tracking={extra} logs each run to {extra}, which cannot be imported in this environment "
                           f"({type(err).__name__}: {err}). Install kvprime's optional extra with `pip install "
                           f"'kvprime[{extra}]'` (in a checkout: pip install -e '.[{extra}]'), or run without "
                           "tracking (tracking=none, the default). Nothing was run.")
    return None


def tracking_settings(cfg: Mapping) -> Mapping:
    """The run's tracking section; a config written before tracking existed has none (no tracker)."""
    section = cfg.get("tracking")
    return section if isinstance(section, Mapping) else {"backend": "none"}
