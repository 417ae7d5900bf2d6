"""One run, one directory: unique run-directory names, one writer at a time, and only what kvprime made is
ever removed.

- Names: ``<parent>/<date>_<time>-<microseconds>-<6 hex>``, made with an exclusive ``mkdir``, so two runs
  started in the same second (on one machine or on several sharing a file system) never share a directory.
  ``<parent>/latest`` links to the newest one.
- Lock: ``run``, ``resume``, ``report`` and ``merge --out`` hold ``.kvprime.lock`` (an OS file lock through
  ``filelock``, released by the kernel when the process dies) while they write; ``.kvprime.lock.json``
  names the holder. A second writer is refused at once with the holder's pid, host and start time. A holder
  record left by a killed process on this host is taken over; one from another host is not (its process may
  be alive where this host cannot see it), and the message says how to break it.
- Removal: a refused run removes only the directories it created itself (recorded when made, in the list of the
  command that made them: ``created_scope``).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import RunDirError
from .results_io import PLACE_ERRORS, write_json

LOCK_NAME = ".kvprime.lock"
HOLDER_NAME = ".kvprime.lock.json"
LATEST = "latest"

# The directories the current command made (outermost first per call), so a refusal removes nothing it did not
# make. One list per command (``created_scope``), so runs in one process never see each other's directories.
_SCOPE: ContextVar[list[Path] | None] = ContextVar("kvprime_created_dirs", default=None)


@contextmanager
def created_scope() -> Iterator[list[Path]]:
    """Record the directories made inside the block in one list: the enclosing block's if there is one (a run's
    job inside ``kvprime run``), else a new one that is dropped when the block ends."""
    outer = _SCOPE.get()
    if outer is not None:
        yield outer
        return
    created: list[Path] = []
    token = _SCOPE.set(created)
    try:
        yield created
    finally:
        _SCOPE.reset(token)


def _created() -> list[Path]:
    """The current command's list; outside any ``created_scope`` a new one, so nothing is remembered."""
    scope = _SCOPE.get()
    return scope if scope is not None else []


def unwritable(path: Path, setting: str) -> RunDirError | None:
    """The error for a directory that cannot be created or written at ``path``, or None if it can."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return RunDirError(f"{setting} points at {path}, which cannot be created: {probe} is a file, not a "
                           "directory. Choose another directory.")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        return RunDirError(f"{setting} points at {path}, which cannot be created or written: permission denied on "
                           f"{probe}. Choose a directory you can write.")
    return None


def _io_error(err: OSError, path: Path, setting: str) -> RunDirError:
    why = PLACE_ERRORS.get(err.errno, err.strerror)
    return RunDirError(f"{setting} points at {path}, which cannot be created or written ({why}: "
                       f"{err.filename or path}). Choose another directory or free the space.")


def make_dirs(path: Path, setting: str) -> Path:
    """``mkdir -p`` that remembers which components it created and explains a failure (naming ``setting``)."""
    path = Path(path).expanduser().absolute()
    err = unwritable(path, setting)
    if err:
        raise err
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    created = _created()
    try:
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # made by another process meanwhile: not ours to remove
                continue
            created.append(p)
    except OSError as exc:
        raise _io_error(exc, path, setting) from None
    return path


def new_run_dir(parent: str, setting: str = "the output root ($KVPRIME_OUTPUT_ROOT or outputs/)") -> str:
    """A new, empty directory under ``parent`` with a name no other run can get (exclusive mkdir)."""
    parent_path = make_dirs(Path(parent), setting)
    for _ in range(100):
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        path = parent_path / f"{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise _io_error(exc, path, setting) from None
        _created().append(path)
        return str(path)
    raise RunDirError(f"could not make a new run directory under {parent_path} (100 names taken).")


def expect_created(path: Path) -> None:
    """Note the components of ``path`` that do not exist yet: something this process runs (Hydra) is about
    to create them, and a refusal may remove them again."""
    path = Path(path).expanduser().absolute()
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    _created().extend(reversed(missing))


def locked_write(target: Path, command: str, setting: str, fn):
    """Run ``fn()`` holding ``target``'s lock, ``target`` made first if needed (and removed again, if this
    process made it, when ``fn`` fails)."""
    with created_scope():
        make_dirs(target, setting)
        try:
            with RunLock(target, command):
                return fn()
        except BaseException:
            remove_created(target)
            raise


def created_here(path: Path) -> bool:
    return Path(path).absolute() in _created()


def remove_created(path: Path, drop_lock_file: bool = False) -> None:
    """Remove ``path`` and the parents this process created for it, each only if it is empty (or holds only
    ``latest``, a link kvprime made). ``drop_lock_file``: the run was undone; its released lock file goes too,
    unless another writer has taken the directory since."""
    path = Path(path).absolute()
    if drop_lock_file and holder(path) is None and not _os_lock_held(path):
        (path / LOCK_NAME).unlink(missing_ok=True)
    created = _created()
    for p in sorted((c for c in created if c == path or c in path.parents), key=lambda c: -len(c.parts)):
        try:
            link = p / LATEST
            if link.is_symlink() and [x.name for x in p.iterdir()] == [LATEST]:
                link.unlink()
            p.rmdir()
        except OSError:
            return
        created.remove(p)


def point_latest(run_dir: Path, target: str | None = None) -> str | None:
    """``<parent>/latest`` -> this run (or ``target``, a name beside it; None removes the link), replaced
    atomically (a file system without links just has none). Returns what it pointed at before."""
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    before = os.readlink(link) if link.is_symlink() else None
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.{secrets.token_hex(3)}"
    try:
        tmp.symlink_to(target if target is not None else run_dir.name)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
    return before


def restore_latest(run_dir: Path, before: str | None) -> None:
    """Undo ``point_latest`` for a run that was refused: the link points where it did (or is gone)."""
    link = Path(run_dir).parent / LATEST
    if not (link.is_symlink() and os.readlink(link) == Path(run_dir).name):
        return  # another run has moved it since
    if before is None:
        link.unlink(missing_ok=True)
    else:
        point_latest(run_dir, before)


def holder(run_dir: Path) -> dict | None:
    path = Path(run_dir) / HOLDER_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(h: dict) -> str:
    return f"`kvprime {h.get('command', '?')}` (pid {h.get('pid')} on host {h.get('host')}, since {h.get('started')})"


def live_holder(run_dir: Path) -> dict | None:
    """The holder record of another writer that may still be running (stale records on this host, and this
    process's own, are ignored)."""
    h = holder(run_dir)
    if h is None:
        return None
    if h.get("host") == socket.gethostname() and h.get("pid") == os.getpid():
        return None
    if h.get("host") == socket.gethostname() and not (_alive(int(h.get("pid", -1))) and _os_lock_held(run_dir)):
        return None  # dead, or a reused pid: the OS lock a live holder keeps is free
    return h


def _os_lock_held(run_dir: Path) -> bool:
    """Whether some process holds the OS lock of ``run_dir`` (probed without creating the lock file)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody can hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def busy_error(run_dir: Path, h: dict) -> RunDirError:
    path = Path(run_dir) / HOLDER_NAME
    if h.get("host") != socket.gethostname():
        fix = (f"If that process is no longer running (check on {h.get('host')}), delete {path} and try again.")
    else:
        fix = {"run": "Wait for it to finish or stop it (a stopped run continues with `kvprime resume <dir>`).",
               "resume": "Wait for it to finish or stop it (a stopped run continues with `kvprime resume <dir>`).",
               "merge": "Wait for it to finish, then run the same merge command again if its output is not there.",
               }.get(str(h.get("command")), "Wait for it to finish, then try again.")
    return RunDirError(f"{run_dir} is in use by {_describe(h)}. kvprime lets one command write a run directory "
                       f"at a time. {fix}")


class RunLock:
    """Exclusive write access to one run directory, for one command (``with RunLock(dir, "run"): ...``)."""

    def __init__(self, run_dir: Path, command: str):
        self.run_dir = Path(run_dir)
        self.command = command
        self._lock: FileLock | None = None

    def acquire(self) -> RunLock:
        h = live_holder(self.run_dir)
        if h is not None:
            raise busy_error(self.run_dir, h)
        lock = FileLock(str(self.run_dir / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise busy_error(self.run_dir, holder(self.run_dir) or {"command": "?", "pid": "?", "host": "?",
                                                                     "started": "?"}) from None
        except OSError as exc:
            raise _io_error(exc, self.run_dir, "the run directory") from None
        # The OS lock is ours. A record still there is from a process that died without releasing (kill -9,
        # power loss), or from another host whose lock this file system may not share.
        try:
            old = holder(self.run_dir)
            if old is not None and old.get("host") != socket.gethostname():
                raise busy_error(self.run_dir, old)
            write_json(self.run_dir / HOLDER_NAME, {
                "pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        except BaseException:  # a full disk, a signal: never keep the OS lock without the record
            lock.release()
            raise
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            h = holder(self.run_dir)
            if h and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
                (self.run_dir / HOLDER_NAME).unlink(missing_ok=True)
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
