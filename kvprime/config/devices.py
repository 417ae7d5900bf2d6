"""The devices ``model.device`` may name, checked against this machine, and the one a model config resolves to
(imports torch only when asked: the settings check runs without it)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import ModelUnavailable

_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)\Z")

# cpu: larger chunks and scoring batches gain nothing on a CPU (the cores are already busy) and their caches and
# stacked copies cost memory; 2048-token encode batches keep the activations in the CPU's cache. Decoding rows
# share each step's weight reads, so one batch of 32 documents beats two smaller ones. The measurements behind
# these numbers are in docs/performance.md.
# cuda: per-cache work, not the batch, bounds a small model on a GPU while peak memory grows with the chunk, and
# generation gains up to 64 rows. So: the smallest batches that keep a 7B model's matmuls large (16k tokens) and
# its chunk of caches small (8 exp01 samples hold ~30k cache tokens, ~4 GB of bf16 keys/values for Mistral-7B),
# beside 4-bit weights on a 24 GB card.
# What batch.*=auto and generation.batch_size=auto resolve to on each kind of device (kvprime.cache.batching).
DEVICE_BATCH_DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"samples": 2, "encode_tokens": 2048, "score_tokens": 4096, "generation": 32},
    "cuda": {"samples": 8, "encode_tokens": 16384, "score_tokens": 32768, "generation": 64},
}


def machine_devices() -> list[str]:
    """The devices this machine offers: cpu, then cuda:0..N-1 when CUDA is available (imports torch)."""
    try:
        import torch  # lazy: torch; the settings check (`kvprime report`, `merge`) runs without it

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch, or a broken CUDA set-up: cpu is all that can be promised
        n = 0
    return ["cpu"] + [f"cuda:{i}" for i in range(n)]


def device_ok(v) -> bool:
    if not isinstance(v, str) or not _DEVICE.match(v):
        return False
    if not v.startswith("cuda"):
        return True  # auto, cpu: no torch needed
    devices = machine_devices()
    return (v == "cuda" and len(devices) > 1) or v in devices


def this_machine() -> str:
    return "this machine has: " + ", ".join(machine_devices())


def resolve_device(cfg: Mapping) -> str:
    """The device a ``model`` config runs on: ``model.device``, or with ``auto`` cuda if present, else cpu."""
    import torch  # lazy: torch; the settings check imports this module and runs without it

    device = cfg.get("device") or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"model.device={device!r}, but this machine has no CUDA device. Use model.device=cpu "
                               "or auto.")
    return device
