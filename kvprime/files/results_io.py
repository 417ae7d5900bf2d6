"""Run-directory files: atomic whole-file writes and a resumable, append-only score log.

A whole file (CSV, JSON, report) is written to a temporary name in the same directory and renamed over the
target, so a reader never sees half a file. ``scores.jsonl`` grows one fsync'ed line per (sample,
condition); a run killed mid-line leaves at most one torn last line, which ``ScoreLog`` drops on reopen,
so a resumed run neither loses a finished score nor writes one twice.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from ..errors import RunDirError

# OS errors that are the place's fault, not kvprime's: reported as one paragraph naming the path.
PLACE_ERRORS: dict[int | None, str] = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file is in the way"}


def raise_write_error(err: OSError, path: Path, after: str = "") -> NoReturn:
    """Re-raise a failed write: as one paragraph naming the path when the place is at fault (full disk,
    permissions, read-only), else unchanged (then it is kvprime's, and reported as internal)."""
    why = PLACE_ERRORS.get(err.errno)
    if why is None:
        raise err
    raise RunDirError(f"could not write {path} ({why}). {after}".strip()) from err


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, data: str | bytes | Iterable[str]) -> None:
    """Write ``data`` (text, bytes, or text in pieces, streamed) to a temporary file beside ``path``, then rename
    it into place: ``path`` is the old file or the whole new one, never a part."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise_write_error(err, path)
    mode = "wb" if isinstance(data, bytes) else "w"
    pieces = [data] if isinstance(data, (str, bytes)) else data
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, mode) as fh:
            for piece in pieces:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise_write_error(err, path, "Nothing was half-written: the file is as it was.")
        raise


def remove_stale_temps(directory: Path) -> int:
    """Delete the temporary files a killed ``write_atomic`` left (``.<name>.<random>.tmp``) in ``directory``
    and its sub-folders; the files they were to replace are intact. Returns how many were removed."""
    n = 0
    for tmp in Path(directory).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            n += 1
    return n


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
    write_atomic(path, (dumps(r) + "\n" for r in rows))


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Each line's object, one at a time (a log of any length in constant memory)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


class JsonlRecords(Sequence):
    """A JSONL file as a read-only sequence of its records, read from the file on every pass: the records are
    never all in memory at once, and each pass gets fresh dicts, so a reader that changes one changes nothing
    another reader sees. Indexing reads up to the index (for the occasional look; iterate for the rest)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, encoding="utf-8") as fh:
            self._n = sum(1 for line in fh if line.strip())

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[dict]:
        return iter_jsonl(self.path)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"record {i} of {self._n} in {self.path}")
        return next(itertools.islice(iter(self), j, None))


def read_jsonl(path: Path, *, skip_torn: bool = False) -> list[dict]:
    """Every line's object. ``skip_torn``: leave out lines that do not parse (a killed writer's last line),
    for a look at a log that ``ScoreLog`` has not repaired yet."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_torn:
                    raise
    return rows


class ScoreLog:
    """Append-only JSONL keyed by (sample_id, condition). It holds the keys written, never the rows: a run's
    memory must not grow with its score lines."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.n_rows = 0
        self.done: set[tuple[str, str]] = set()
        self.repaired = 0
        self._fd: int | None = None
        if self.path.exists():
            self._recover()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise_write_error(err, self.path)

    def _lines(self):
        """(line, whether to keep it) for every line of the log: a torn, unparsable or repeated line is not kept."""
        seen: set[tuple[str, str]] = set()
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                if not line.endswith("\n"):  # the last line of a writer killed mid-line
                    yield line, None
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # only a crash mid-write makes one; it is redone
                    yield line, None
                    continue
                key = (row["sample_id"], row["condition"])
                yield line, (None if key in seen else key)
                seen.add(key)

    def _recover(self) -> None:
        for _, key in self._lines():
            if key is None:
                self.repaired += 1
            else:
                self.done.add(key)
                self.n_rows += 1
        if self.repaired:  # keep the whole records only, streamed into the file that replaces the log
            write_atomic(self.path, (line for line, key in self._lines() if key is not None))

    def append(self, row: dict) -> None:
        key = (row["sample_id"], row["condition"])
        if key in self.done:
            raise RuntimeError(f"score for {key} is already in {self.path}")
        if self._fd is None:
            raise RuntimeError(f"{self.path} is closed; no score can be appended")
        data = memoryview((dumps(row) + "\n").encode())
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as err:
            # A full disk can leave part of the line written: cut it off, so the log ends at a whole record
            # (were the cut to fail too, the torn line is dropped on resume).
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise_write_error(err, self.path, f"The {self.n_rows} scores written before it are kept; make room, "
                                              f"then continue with `kvprime resume {self.path.parent}`.")
        self.done.add(key)
        self.n_rows += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
