"""The devices ``model.device`` may name, checked against this machine (imports torch only when asked)."""

from __future__ import annotations

import re

_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)\Z")


def machine_devices() -> list[str]:
    """The devices this machine offers: cpu, then cuda:0..N-1 when CUDA is available (imports torch)."""
    try:
        import torch

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
