"""``kvprime merge``: join the run directories of one sharded run into one run directory.

A run split with ``run.num_shards=N run.shard=i`` scores chunks i, i+N, i+2N, ... of the selection, a chunk
being ``batch.samples`` consecutive samples (``kvprime.pipeline.sharding.shard``). Merging checks that the shards
belong together (one config apart from ``run.shard``/``resume``/``progress``, one plan, one model: name and
weights digest), that they are exactly shards 0..N-1, each once and each finished, and that together they hold
the unsharded selection: every sample once, every (sample, condition) score once (``scaleout.shards``). It then
writes an ordinary run directory (config.json with ``run.num_shards=1``, plan.json, inputs.jsonl and
scores.jsonl in the unsharded order, metadata.json) and finalizes it. Each shard batches exactly the samples
the one-job run batches together, so the merged tables equal those of the same run done in one job, bit for bit.

A merge is as atomic as a run: it writes into a work folder beside its target,
``.<name>.kvprime-merge-in-progress`` (locked while it writes), and renames it to ``<name>`` only once finalize has
written every file. A killed merge leaves either no output folder or a complete one; the same command run again
takes the leftover work folder over, empties it and does the job. An output folder that is this very merge,
complete (a merge killed just after putting it in place leaves one), is redone without ``overwrite``: its bytes
do not change. ``overwrite`` replaces an earlier run directory the same way: the old one is renamed aside
(``.<name>.kvprime-merge-replaced``) only when the new one is complete, the new one is renamed into place, and the
old one is removed; a merge killed between the two renames is rolled back by the next merge into that target,
which puts the old one back first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import KvprimeError, RunDirError
from ..files import rundir
from ..files.results_io import dumps, raise_write_error, write_atomic
from ..files.rundir import HOLDER_NAME, LOCK_NAME
from ..reporting import finalize
from .shards import Merged, MergeError, gather, show
from .sweep import is_sweep_dir, job_dirs

STAGING_SUFFIX = ".kvprime-merge-in-progress"
REPLACED_SUFFIX = ".kvprime-merge-replaced"
LOCK_FILES = (LOCK_NAME, HOLDER_NAME)


def expand_run_dirs(paths) -> list[Path]:
    """Run directories from the command line: a Hydra sweep directory (e.g. ``-m run.shard=0,1,2``) stands for
    its numbered job directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not (p / "config.json").exists() and is_sweep_dir(p):
            out.extend(job_dirs(p))
        else:
            out.append(p)
    return out


def staging_dir(out_dir) -> Path:
    """The work folder a merge into ``out_dir`` writes, beside it, before renaming it to ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{STAGING_SUFFIX}"


def replaced_dir(out_dir) -> Path:
    """Where ``overwrite`` keeps the earlier ``out_dir`` between the two renames that swap it for the new one."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{REPLACED_SUFFIX}"


# The merge's write points besides results_io.write_atomic: tests/fault_runner.py kills a merge at each of them,
# so they are looked up here at call time.
def rename_dir(src: Path, dst: Path) -> None:
    """Rename the folder ``src`` to ``dst`` (which does not exist) and make the rename durable."""
    try:
        os.replace(src, dst)
    except OSError as err:
        raise_write_error(err, dst, f"Nothing was moved; make {Path(dst).parent} writable and run the same "
                                    "command again.")
    _fsync_dir(Path(dst).parent)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree; what is gone already (another merge cleaning up too) is no error."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder: the rename is atomic all the same
        pass
    finally:
        os.close(fd)


def merge_runs(run_dirs, out_dir, *, check_dataset: bool = True, overwrite: bool = False) -> dict:
    """Merge the shard run directories ``run_dirs`` (any order) into ``out_dir`` and finalize it.

    Returns ``finalize``'s results dict with a ``merge`` entry (shards, sample count, selection check).
    Raises ``MergeError`` (a ValueError) naming what differs, which shard is missing or repeated, or which
    samples/scores are missing or duplicated. ``check_dataset``: also reload the selection (data only, no
    model) and compare; where the data cannot be loaded here the merge goes on and says so. ``overwrite``:
    replace ``out_dir`` if it already holds a run directory (else a non-empty ``out_dir`` is refused, unless it
    holds this very merge, finished: the same command run again redoes it). Either way ``out_dir`` appears, or
    changes, only once the merged run is complete (see the module's docstring).
    """
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir)
    _check_arguments(run_dirs, out_dir)
    merged = gather(run_dirs, out_dir, check_dataset)
    with rundir.created_scope():  # the parents of --out this merge makes, and only those, a failure removes
        return _write_and_publish(merged, out_dir, overwrite)


def _check_arguments(run_dirs: list[Path], out_dir: Path) -> None:
    if not run_dirs:
        raise MergeError("no run directories to merge.")
    given = Counter(d.resolve() for d in run_dirs)
    if len(given) != len(run_dirs):
        dup = sorted({str(d) for d in run_dirs if given[d.resolve()] > 1})
        raise MergeError(f"the same directory is given more than once: {', '.join(dup)}.")
    if out_dir.resolve() in given:
        raise MergeError(f"the output directory {out_dir} is one of the shards; choose a new directory.")
    err = rundir.unwritable(out_dir, "--out")
    if err is not None:
        raise err
    parent = out_dir.absolute().parent
    if out_dir.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"--out {out_dir}: a merge writes beside it, in {parent}, and renames its work folder into "
                         f"place, but {parent} is not writable (permission denied). Choose an --out whose parent "
                         "folder you can write.")


def _contents(folder: Path) -> list[str]:
    """What a folder holds besides the lock files kvprime leaves in every directory it wrote."""
    return sorted(p.name for p in folder.iterdir() if p.name not in LOCK_FILES)


def _check_target(out_dir: Path, overwrite: bool, same) -> None:
    """An existing ``out_dir`` must be empty, this very merge, finished (``same(out_dir)``: the same command run
    again), or a run directory that ``overwrite`` may replace."""
    if not out_dir.is_dir():
        return
    held = _contents(out_dir)
    if not held or (not overwrite and same(out_dir)):
        return
    if not overwrite:
        if (out_dir / finalize.COMPLETION_RECORD).is_file():
            what = f"a finished run directory ({finalize.COMPLETION_RECORD})"
        elif (out_dir / "config.json").is_file():
            what = (f"an unfinished run directory (config.json without {finalize.COMPLETION_RECORD}: a run, or an "
                    "older kvprime's merge, killed before it finished)")
        else:
            what = f"other files ({show(held, 3)})"
        raise MergeError(f"--out {out_dir} already holds {what}. Choose a new --out, or add --overwrite to replace "
                         "it (it stays as it is until the new merged run is complete).")
    if not (out_dir / "config.json").is_file():
        raise MergeError(f"--out {out_dir} is not empty ({show(held, 3)}) and is not a kvprime run directory (no "
                         "config.json); --overwrite replaces only a run directory. Choose a new --out.")


def _holds(out_dir: Path, merged: Merged) -> bool:
    """Whether ``out_dir`` is a finished merge whose files are, byte for byte, the ones this merge writes before
    finalizing: the same command, run again after it finished or after it was killed once its output was in
    place. (Whether finalize's files are the same too is known once they are written: ``_same_tree``.)"""
    if not (out_dir / finalize.COMPLETION_RECORD).is_file():
        return False
    return all(_file_digest(out_dir / name) == _digest(chunks) for name, chunks in _file_chunks(merged).items())


def _same_tree(a: Path, b: Path) -> bool:
    """Whether two folders hold the same files with the same bytes (lock files and temporaries aside)."""
    return _tree(a) == _tree(b)


def _tree(folder: Path) -> dict[str, str | None]:
    return {str(p.relative_to(folder)): _file_digest(p) for p in folder.rglob("*")
            if p.is_file() and p.name not in LOCK_FILES and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def _file_chunks(merged: Merged) -> dict[str, Iterable[Any]]:
    """Each file ``_write`` writes, as the pieces of its text in order (large files are not joined here): strings,
    or the bytes of a file copied as it is."""
    files: dict[str, Iterable[Any]] = {
        "config.json": [dumps(merged.cfg, indent=2) + "\n"], "plan.json": [dumps(merged.plan, indent=2) + "\n"],
        "inputs.jsonl": (dumps(r) + "\n" for r in merged.inputs), "scores.jsonl": merged.score_lines}
    if merged.inspect is not None:
        files["inspect.json"] = [merged.inspect.read_bytes()]
    files["metadata.json"] = [dumps(merged.meta, indent=2) + "\n"]
    return files


def _digest(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk.encode() if isinstance(chunk, str) else chunk)
    return h.hexdigest()


def _file_digest(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return _digest(iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        return None


def _write_and_publish(merged: Merged, out_dir: Path, overwrite: bool) -> dict:
    """Write and finalize the merged run in the work folder, then rename it into place (under its lock)."""
    rundir.make_dirs(out_dir.absolute().parent, "--out")
    staging = staging_dir(out_dir)
    lock = _lock_work_folder(staging, out_dir)
    out_lock = None
    try:
        _recover(out_dir)
        _check_target(out_dir, overwrite, lambda d: _holds(d, merged))  # refused before the work if it must be
        if out_dir.exists():  # `kvprime report` on it, or another merge's swap, must not run meanwhile
            out_lock = rundir.RunLock(out_dir, "merge").acquire()
        for name in _contents(staging):  # a killed merge's leftovers: this merge writes every file anew
            remove_path(staging / name)
        _write(staging, merged)
        results = finalize.finalize(staging)
        _check_target(out_dir, overwrite, lambda d: _same_tree(d, staging))  # nothing added or edited since
        _publish(staging, out_dir, lock, out_lock)
    except BaseException:
        if out_lock is not None:
            out_lock.release()
        if staging.exists():
            _abandon(staging, lock)
        try:
            _recover(out_dir)
        except (OSError, KvprimeError):  # the next merge into out_dir rolls it back; the first error is the one
            pass
        rundir.remove_created(out_dir.absolute().parent)
        raise
    results["merge"] = merged.summary
    return results


def _lock_work_folder(staging: Path, out_dir: Path):
    """Create (or take over) the work folder and lock it: one merge into ``out_dir`` at a time."""
    if staging.exists() and not staging.is_dir():
        raise MergeError(f"{staging}, the work folder of a merge into {out_dir}, is a file; remove it and run the "
                         "same command again.")
    try:
        staging.mkdir(exist_ok=True)
    except OSError as err:
        raise_write_error(err, staging)
    holder = rundir.live_holder(staging)
    if holder is None:
        try:
            return rundir.RunLock(staging, "merge").acquire()
        except RunDirError:
            holder = rundir.live_holder(staging)  # taken between the look and the lock
            if holder is None:
                raise
    who = (f"`kvprime {holder.get('command', '?')}` (pid {holder.get('pid')} on host {holder.get('host')}, since "
           f"{holder.get('started')})")
    if holder.get("host") == socket.gethostname():
        fix = "Wait for it to finish (or stop it), then run this command again if you still need to."
    else:
        fix = (f"If that process is no longer running (check on {holder.get('host')}), delete {staging} and run this "
               "command again.")
    raise MergeError(f"another merge into {out_dir} is running: {who} holds its work folder {staging}. {fix}")


def _write(staging: Path, merged: Merged) -> None:
    """The merged run's files (``_file_chunks`` says what each holds), metadata.json last, as a run writes it."""
    for name, chunks in _file_chunks(merged).items():
        parts = list(chunks)
        write_atomic(staging / name, b"".join(parts) if parts and isinstance(parts[0], bytes) else "".join(parts))


def _publish(staging: Path, out_dir: Path, lock, out_lock) -> None:
    """Swap the finished work folder in: the earlier ``out_dir`` (if any) aside, the new one in, the old removed."""
    old = replaced_dir(out_dir)
    if out_dir.exists():
        rename_dir(out_dir, old)
        if out_lock is not None:
            out_lock.run_dir = old  # its holder record moved with the folder
    rename_dir(staging, out_dir)
    lock.run_dir = out_dir  # likewise: the work folder's lock is now out_dir's
    lock.release()
    if out_lock is not None:
        out_lock.release()
    remove_path(old)


def _recover(out_dir: Path) -> None:
    """Finish or undo the swap of a merge killed inside ``_publish``: with ``out_dir`` in place only the old copy's
    removal is left; without it, the old one goes back (the new one was never published)."""
    old = replaced_dir(out_dir)
    if not old.exists():
        return
    if out_dir.exists():
        remove_path(old)
    else:
        rename_dir(old, out_dir)


def _abandon(staging: Path, lock) -> None:
    """A merge that failed leaves no work folder behind: its files, then its released lock, then the folder."""
    for name in _contents(staging):
        remove_path(staging / name)
    lock.release()
    for name in LOCK_FILES:
        (staging / name).unlink(missing_ok=True)
    try:
        staging.rmdir()
    except OSError:  # another merge has taken it since
        pass


