"""A multirun's parent run, found by its jobs through the sweep directory.

Every job of a sweep is a directory ``<sweep_dir>/<job number>``; ``<sweep_dir>/tracking_parent.json`` records the
parent run of each (tracker, store, experiment) the sweep's jobs log to. The first job to finish makes the parent
and records it, under a file lock, and every later job reads it: jobs that finish at once in other processes
(joblib) or on other machines (Slurm, with the sweep directory on a shared file system) get one parent, and a
resumed sweep logs its jobs under the parent it already has. Hydra's callbacks were not used: they run in the
launching process only, and Hydra turns a callback's exception into a warning, so a tracker that cannot log would
go unnoticed there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from ..files.results_io import write_json
from .base import TrackingError, Where

PARENT_RECORD = "tracking_parent.json"
LOCK_TIMEOUT_S = 300  # making a parent run takes a second; a lock held this long belongs to a stuck job


def _slot(backend: str, where: Where) -> str:
    return f"{backend} {where.tracking_uri} {where.experiment_name}"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}  # a record cut short: its parent is made again


def parent_run(sweep_dir: Path, backend: str, where: Where, make: Callable[[], str]) -> str:
    """The id of the sweep's parent run for ``backend`` at ``where``: recorded, or made by ``make()`` and recorded."""
    path = Path(sweep_dir) / PARENT_RECORD
    try:
        with FileLock(str(path.with_name(f".{PARENT_RECORD}.lock")), timeout=LOCK_TIMEOUT_S):
            record = _read(path)
            slot = _slot(backend, where)
            if slot not in record:
                record[slot] = make()
                write_json(path, record)
            return record[slot]
    except Timeout as err:
        raise TrackingError(f"the sweep's parent run could not be found or made: another job held {err.lock_file} "
                            f"for {LOCK_TIMEOUT_S} s. If no job of the sweep is running, remove that file and "
                            "resume the sweep.") from err
