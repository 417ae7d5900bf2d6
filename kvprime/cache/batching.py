"""Batch sizes: the config's numbers, or ``auto``, the defaults of the device the model runs on.

Batching changes no number beyond float rounding (tested <= 1e-4); it trades memory for speed. On a CPU an
encode of one sample already keeps every core busy, so batches only need to be large enough to amortise
per-call overhead; on a GPU one sample leaves most of the chip idle, so the batches must be large.
``auto`` is resolved once, when a run starts, and the run's ``config.json`` records the numbers used
(sharding deals chunks of ``batch.samples``, so a merge must see the numbers, not ``auto``).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import settings
from ..config.devices import resolve_device
from ..errors import ConfigError

DEFAULTS = settings.DEVICE_BATCH_DEFAULTS  # declared with the device checks (kvprime.config.devices)

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
    What each setting accepts is declared in ``kvprime.config.settings`` (checked here too, for callers that bypass
    ``settings.check``)."""
    if device is None:
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
