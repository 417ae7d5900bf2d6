"""Batch sizes: the config's numbers, or ``auto``, the defaults of the device the model runs on.

Batching changes no number beyond float rounding (tested <= 1e-4); it trades memory for speed. On a CPU an
encode of one sample already keeps every core busy, so batches only need to be large enough to amortise
per-call overhead; on a GPU one sample leaves most of the chip idle, so the batches must be large.
``auto`` is resolved once, when a run starts, and the run's ``config.json`` records the numbers used
(sharding deals chunks of ``batch.samples``, so a merge must see the numbers, not ``auto``).
"""

from __future__ import annotations

from collections.abc import Mapping

from . import settings
from .errors import ConfigError

# cpu: on a 2-core machine with SmolLM2-135M (exp01, 12 samples) 2 samples per chunk and 4096-token scoring
# batches scored in 64.0 s at a peak of 2195 MB, against 68.7 s and 3213 MB with 4 and 8192: larger batches
# gain nothing on a CPU and their caches and stacked copies cost memory (README, Performance). Encode
# batches of 2048 tokens ran at 137 GFLOP/s against 115-118 for 4096 (8 samples; activations that stay in
# cache; 1024 gave the same as 2048). Generation,
# 16 SQuAD documents: 14.6 tok/s one at a time, 38.5 in batches of 8, 44.5 of 16, 44.4 of 32.
# cuda: on an H100 with SmolLM2-135M (fp32, exp01, 64 samples) encode+score took 6.6-6.8 s for every setting
# from 4 to 64 samples per chunk (per-cache work, not the batch, bounds a 135M model there), while peak memory
# grew from 2.8 to 51 GB; generation gained up to 64 rows (42.8 tok/s at 1, 935 at 64, 937 at 128). So: the
# smallest batches that keep a 7B model's matmuls large (16k tokens) and its chunk of caches small (8 exp01
# samples hold ~30k cache tokens, ~4 GB of bf16 keys/values for Mistral-7B), beside 4-bit weights on 24 GB.
DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"samples": 2, "encode_tokens": 2048, "score_tokens": 4096, "generation": 16},
    "cuda": {"samples": 8, "encode_tokens": 16384, "score_tokens": 32768, "generation": 64},
}

# (config section, key, DEFAULTS key)
_KEYS = (("batch", "samples", "samples"), ("batch", "encode_tokens", "encode_tokens"),
         ("batch", "score_tokens", "score_tokens"), ("generation", "batch_size", "generation"))


class BatchSettingError(ConfigError):
    pass


def device_kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def resolve(cfg: Mapping, device: str | None = None) -> dict:
    """``cfg`` (a plain dict) with every ``auto``/null batch setting replaced by the device's default.

    ``device`` defaults to the one the model config resolves to (``model.device``, auto: cuda if present).
    What each setting accepts is declared in ``kvprime.settings`` (checked here too, for callers that bypass
    ``settings.check``)."""
    if device is None:
        from .models import resolve_device

        device = resolve_device(cfg.get("model") or {})
    defaults = DEFAULTS[device_kind(device)]
    out = dict(cfg)
    for section, key, name in _KEYS:
        values = dict(out.get(section) or {})
        dotted = f"{section}.{key}"
        value = settings.check_value(dotted, values.get(key, settings.default(dotted)), error=BatchSettingError)
        if value is None or value == "auto":
            values[key] = defaults[name]
        out[section] = values
    return out
