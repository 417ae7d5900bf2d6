"""tracking=mlflow: a finished run logged to MLflow through ``MlflowClient`` (no active-run state, no global tracking
URI), imported only when a run asks for it (the extra ``kvprime[mlflow]``).

The default store is a SQLite file (no server); its artifacts go to ``mlartifacts/`` beside it, not to the current
directory. Logging a run directory twice (a resumed finished run) updates the run that holds its ``kvprime.run_dir``
tag instead of making another; params it already has keep their first values. Writers of one SQLite file take
turns (a file lock beside it): SQLite refuses a second writer instead of waiting long enough for jobs that finish at
once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from .base import TrackingError, Where, missing_extra, register_tracker
from .record import RunRecord

PARENT_TAG = "mlflow.parentRunId"
SQLITE = "sqlite:///"
BATCH = 100  # MLflow's log_batch takes at most 100 params and 100 tags a call
# MLflow's own limits on a value's length (mlflow.utils.validation), for a config value or a tag that is longer.
MAX_PARAM = 6000
MAX_TAG = 8000


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store (MLflow would put them under the current directory); a server's are its own."""
    db = _sqlite_file(uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db else None


@contextlib.contextmanager
def _store(uri: str) -> Iterator[None]:
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db.with_name(f".{db.name}.lock"))):
        yield


def _chunks(items: list, n: int = BATCH) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


@register_tracker("mlflow")
class MlflowTracker:
    extra = "mlflow"

    def require(self) -> None:
        err = missing_extra("mlflow", self.extra)
        if err is not None:
            raise err

    def log(self, record: RunRecord, where: Where, parent: str | None) -> str:
        doing = f"{record.run_dir} is complete, but logging it to MLflow"
        with self._failing_as(where, doing), _store(where.tracking_uri):
            client = self._client(where)
            experiment = self._experiment(client, where)
            run_id = self._run_of(client, experiment, record) or client.create_run(
                experiment, run_name=record.name).info.run_id
            self._log_values(client, run_id, record, parent)
            for rel in record.artifacts:
                client.log_artifact(run_id, str(record.run_dir / rel),
                                    artifact_path=None if rel.parent == Path(".") else rel.parent.as_posix())
            client.set_terminated(run_id, "FINISHED")
            if parent is not None:  # the parent is as finished as its latest job
                client.set_terminated(parent, "FINISHED")
            return run_id

    def parent_of(self, sweep_dir: Path, where: Where) -> str:
        with self._failing_as(where, f"making the MLflow parent run of sweep {sweep_dir}"), _store(where.tracking_uri):
            client = self._client(where)
            run = client.create_run(self._experiment(client, where), run_name=Path(sweep_dir).name,
                                    tags={"kvprime.sweep_dir": str(Path(sweep_dir).resolve())})
            return run.info.run_id

    # ------------------------------------------------------------ MLflow

    @staticmethod
    def _client(where: Where):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=where.tracking_uri)

    @staticmethod
    def _experiment(client, where: Where) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(where.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(where.experiment_name,
                                            artifact_location=_artifact_location(where.tracking_uri))
        except MlflowException:  # made meanwhile by a job logging to a server
            found = client.get_experiment_by_name(where.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    @staticmethod
    def _run_of(client, experiment: str, record: RunRecord) -> str | None:
        """The run already logged for this run directory, if any."""
        run_dir = record.tags["kvprime.run_dir"]
        if "'" in run_dir:
            return None
        runs = client.search_runs([experiment], filter_string=f"tags.`kvprime.run_dir` = '{run_dir}'", max_results=1)
        return runs[0].info.run_id if runs else None

    @staticmethod
    def _log_values(client, run_id: str, record: RunRecord, parent: str | None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        known = client.get_run(run_id).data.params
        now = int(time.time() * 1000)
        params = [Param(k, v[:MAX_PARAM]) for k, v in record.params.items() if k not in known]
        tags = [RunTag(k, v[:MAX_TAG]) for k, v in record.tags.items()]
        if parent is not None:
            tags.append(RunTag(PARENT_TAG, parent))
        metrics = [Metric(k, v, now, 0) for k, v in record.metrics.items()]
        for chunk in _chunks(params):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks(tags):
            client.log_batch(run_id, tags=chunk)
        for chunk in _chunks(metrics, 1000):
            client.log_batch(run_id, metrics=chunk)

    @staticmethod
    @contextlib.contextmanager
    def _failing_as(where: Where, doing: str) -> Iterator[None]:
        """MLflow's and its store's errors as one paragraph naming the store (the run directory stays as it is)."""
        try:
            yield
        except TrackingError:
            raise
        except Exception as err:  # noqa: BLE001 -- MLflow, SQLAlchemy, HTTP: any of them means "not logged"
            raise TrackingError(f"{doing} failed: MLflow at tracking.tracking_uri={where.tracking_uri!r} (experiment "
                                f"{where.experiment_name!r}) answered {type(err).__name__}: {err}. Check the URI (a "
                                "server must be running; a sqlite:/// file's folder must be writable); `kvprime "
                                "resume <run_dir>` logs a finished run again without scoring it.") from err
