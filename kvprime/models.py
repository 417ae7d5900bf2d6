"""Load a model and tokenizer from a ``conf/model/*.yaml`` entry.

Sources: ``asset`` (a packaged model fetched by ``make setup`` into KVPRIME_HOME), ``local`` (an HF folder),
``hub`` (a hub id; needs network and usually a GPU), ``tiny_random`` (built in-process). Every check that
can fail without weights (CUDA for 4-bit, hub reachable, RoPE support for the run's conditions) runs first,
in ``model_config``, so a bad setting costs seconds, not a model load.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError, UnavailableError

SOURCES = ("asset", "local", "hub", "tiny_random")
DTYPES = ("float32", "bfloat16", "float16")


class ModelUnavailable(UnavailableError):
    """The model cannot be used on this machine, with the reason and what to do instead."""


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not supported. Accepted: {', '.join(DTYPES)}.")
    return getattr(torch, name)


def resolve_device(cfg: Mapping) -> str:
    import torch

    device = cfg.get("device") or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"model.device={device!r}, but this machine has no CUDA device. Use model.device=cpu "
                               "or auto.")
    return device


def _folder(cfg: Mapping) -> str:
    source = cfg.get("source")
    if source == "asset":
        from . import assets

        return str(assets.fetch(cfg["asset"]))
    if source == "local":
        path = Path(os.path.expanduser(str(cfg.get("path") or "")))
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model.path={str(path)!r} is not a model folder (no config.json there).")
        return str(path)
    if source == "hub":
        return cfg["hub_id"]
    raise ConfigError(f"model.source={source!r} is not known. Accepted: {', '.join(SOURCES)}.")


def model_config(cfg: Mapping):
    """The transformers config, without weights: enough for every pre-load check."""
    source = cfg.get("source")
    if source == "tiny_random":
        from .tiny import tiny_config

        return tiny_config(cfg.get("arch", "llama"), **dict(cfg.get("overrides") or {}))
    if cfg.get("quantization"):
        import torch

        if not torch.cuda.is_available():
            raise ModelUnavailable(
                f"model {cfg.get('name')!r} asks for quantization={cfg['quantization']!r} (bitsandbytes 4-bit), "
                "which needs a CUDA GPU, and this machine has none. On a GPU machine install the extra "
                "(pip install -e '.[gpu]'); here use model=smollm2_135m_instruct or model=tiny_random_llama."
            )
    from transformers import AutoConfig

    folder = _folder(cfg)
    try:
        return AutoConfig.from_pretrained(folder)
    except OSError as err:
        if source == "hub":
            raise ModelUnavailable(
                f"model {cfg.get('name')!r} loads {folder!r} from the HuggingFace hub, which cannot be reached "
                f"from here (or the id is wrong/gated: log in with `hf auth login`). Use a packaged model "
                f"(model=smollm2_135m_instruct) or point model.source=local model.path=<folder> at a copy. "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
        raise ModelUnavailable(f"cannot read the model config in {folder!r}: {err}") from err


def load(cfg: Mapping):
    """(model, tokenizer, info) with the model in eval mode; ``info`` goes into the run's metadata."""

    source = cfg.get("source")
    dtype = _dtype(cfg.get("dtype") or "float32")
    if source == "tiny_random":
        from .tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model(cfg.get("arch", "llama"), seed=int(cfg.get("seed", 0)), vocab_size=len(tokenizer),
                           device="cpu", **dict(cfg.get("overrides") or {})).to(dtype)
        info = {"source": "tiny_random", "arch": cfg.get("arch", "llama"), "seed": int(cfg.get("seed", 0)),
                "weights_sha256": _state_dict_sha256(model)}
        return model.to(resolve_device(cfg)), tokenizer, info

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_config(cfg)  # the cheap checks first
    folder = _folder(cfg)
    kwargs = {"dtype": dtype}
    if cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = cfg["attn_implementation"]
    if cfg.get("quantization"):
        from transformers import BitsAndBytesConfig

        if cfg["quantization"] != "nf4":
            raise ConfigError(f"model.quantization={cfg['quantization']!r} is not supported. Accepted: nf4, null.")
        compute = _dtype(cfg.get("compute_dtype") or "bfloat16")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True)
        kwargs["dtype"] = compute
    if cfg.get("device_map"):
        kwargs["device_map"] = cfg["device_map"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    if not cfg.get("device_map"):
        model = model.to(resolve_device(cfg))
    info = {"source": source, "path": folder, "commit": getattr(model.config, "_commit_hash", None)}
    if source in ("asset", "local"):
        info["weights_sha256"] = _files_sha256(Path(folder))
    return model, tokenizer, info


def _files_sha256(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        out[path.name] = digest.hexdigest()
    return out


def _state_dict_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
