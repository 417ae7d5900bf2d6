"""Experiment tracking: a finished run logged to a tracker (tracking=mlflow) from its run directory's files.

``require(cfg)`` is called before a run loads anything: a tracker whose library is missing stops it there, with
the extra to install. ``log_run(run_dir, sweep_dir)`` is called once the run's report is written; a multirun job
passes its sweep directory and is logged as a child of the sweep's parent run (``kvprime.tracking.sweeps``). Another
tracker is one more module here (``kvprime.tracking.base``), registered under its name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..config.confdir import outputs_root
from .base import TRACKERS, Tracker, TrackingError, Where, tracking_settings
from .record import read_run
from .sweeps import parent_run

__all__ = ["TrackingError", "Where", "default_uri", "log_run", "require", "tracker_for", "where"]


def default_uri() -> str:
    """tracking.tracking_uri=null: a SQLite file under the output root, so no server is needed."""
    return "sqlite:///" + (Path(outputs_root()) / "mlflow.db").as_posix()


def tracker_for(cfg: Mapping) -> tuple[str, Tracker] | None:
    """The run's tracker and its name, or None for tracking=none (and for a name the settings check refuses)."""
    backend = tracking_settings(cfg).get("backend") or "none"
    if backend == "none" or backend not in TRACKERS:
        return None
    return backend, TRACKERS.get(backend)


def where(cfg: Mapping) -> Where:
    settings = tracking_settings(cfg)
    return Where(tracking_uri=settings.get("tracking_uri") or default_uri(),
                 experiment_name=settings.get("experiment_name") or str(cfg["experiment"]["name"]))


def require(cfg: Mapping) -> None:
    """Refuse, before anything loads, a tracker that cannot be imported (``ConfigError`` naming its extra)."""
    found = tracker_for(cfg)
    if found is not None:
        found[1].require()


def log_run(run_dir, sweep_dir=None) -> str | None:
    """Log the finished run in ``run_dir`` as its config.json asks; ``sweep_dir``: the multirun it is a job of.
    Returns where it went (for the terminal), or None when the run is not tracked."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    found = tracker_for(cfg)
    if found is None:
        return None
    name, tracker = found
    place = where(cfg)
    record = read_run(run_dir)
    parent = None
    if sweep_dir is not None:
        record.name = f"{Path(sweep_dir).name}/{run_dir.name}"  # job 0 of sweep <name>, not a bare 0
        parent = parent_run(Path(sweep_dir), name, place, lambda: tracker.parent_of(Path(sweep_dir), place))
    run_id = tracker.log(record, place, parent)
    return f"{name} run {run_id} in experiment {place.experiment_name!r} at {place.tracking_uri}"
