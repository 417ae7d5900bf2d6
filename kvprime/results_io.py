"""Run-directory files: atomic whole-file writes and a resumable, append-only score log.

A whole file (CSV, JSON, report) is written to a temporary name in the same directory and renamed over the
target, so a reader never sees half a file. ``scores.jsonl`` grows one fsync'ed line per (sample,
condition); a run killed mid-line leaves at most one torn last line, which ``ScoreLog`` drops on reopen,
so a resumed run neither loses a finished score nor writes one twice.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value):
    """JSON has no NaN/inf: store them as null (the score line says why in ``nonfinite``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(obj, **kw) -> str:
    return json.dumps(_clean(obj), ensure_ascii=False, **kw)


def write_json(path: Path, obj) -> None:
    write_atomic(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows) -> None:
    write_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class ScoreLog:
    """Append-only JSONL keyed by (sample_id, condition)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.done: set[tuple[str, str]] = set()
        self.repaired = 0
        if self.path.exists():
            self._recover()
        self._fh = open(self.path, "a")

    def _recover(self) -> None:
        raw = self.path.read_text()
        lines = raw.split("\n")
        torn = lines.pop() if not raw.endswith("\n") else ""
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                self.repaired += 1  # only a crash mid-write makes one; it is redone
                continue
            key = (row["sample_id"], row["condition"])
            if key in self.done:
                self.repaired += 1
                continue
            self.done.add(key)
            self.rows.append(row)
        if torn.strip():
            self.repaired += 1
        if self.repaired:
            write_jsonl(self.path, self.rows)

    def append(self, row: dict) -> None:
        key = (row["sample_id"], row["condition"])
        if key in self.done:
            raise RuntimeError(f"score for {key} is already in {self.path}")
        self._fh.write(dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(key)
        self.rows.append(row)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
