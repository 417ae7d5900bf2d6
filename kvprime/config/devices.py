"""The devices ``model.device`` may name, checked against this machine, and the one a model config resolves to
(imports torch only when asked: the settings check runs without it)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import ModelUnavailable

_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)\Z")

# cpu: on a 2-core machine with SmolLM2-135M (exp01, 12 samples) 2 samples per chunk and 4096-token scoring
# batches scored in 64.0 s at a peak of 2195 MB, against 68.7 s and 3213 MB with 4 and 8192: larger batches
# gain nothing on a CPU and their caches and stacked copies cost memory (README, Performance). Encode
# batches of 2048 tokens ran at 137 GFLOP/s against 115-118 for 4096 (8 samples; activations that stay in
# cache; 1024 gave the same as 2048). Generation (SmolLM2), 16 SQuAD documents: 14.6 tok/s one at a time,
# 38.5 in batches of 8, 44.5 of 16. Rows share each decode step's weight reads: a Qwen2.5-0.5B step of 32 rows
# cost 1.4x one of 16 here (fp32 matmuls of 16 vs 32 rows: 2.4 vs 3.7 ms, LM head 132 vs 182 ms), so 20
# documents generated in 43.4 s as one batch of 32 (a test job may have shared the cores) against 47.2 s as
# 16 + 4 (idle), 2026-12-03.
# cuda: on an H100 with SmolLM2-135M (fp32, exp01, 64 samples) encode+score took 6.6-6.8 s for every setting
# from 4 to 64 samples per chunk (per-cache work, not the batch, bounds a 135M model there), while peak memory
# grew from 2.8 to 51 GB; generation gained up to 64 rows (42.8 tok/s at 1, 935 at 64, 937 at 128). So: the
# smallest batches that keep a 7B model's matmuls large (16k tokens) and its chunk of caches small (8 exp01
# samples hold ~30k cache tokens, ~4 GB of bf16 keys/values for Mistral-7B), beside 4-bit weights on 24 GB.
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
