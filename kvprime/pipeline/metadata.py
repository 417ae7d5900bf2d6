"""What a run directory records about where its numbers came from."""

from __future__ import annotations

import hashlib
import platform
import resource
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

PACKAGES = ("kvprime", "torch", "transformers", "tokenizers", "accelerate", "hydra-core", "omegaconf", "numpy",
            "scipy", "pandas", "datasets", "sentence-transformers", "bitsandbytes")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """The checkout's commit; none for a wheel install (its folder is site-packages, whose enclosing git
    repository, if any, is not kvprime's)."""
    from ..config.confdir import INSTALLED_FROM_WHEEL

    if INSTALLED_FROM_WHEEL:
        return {"commit": None, "dirty": None, "installed_from": "wheel"}
    repo = Path(__file__).resolve().parents[2]  # kvprime/pipeline/ -> the checkout

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def sample_ids_sha256(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def environment(device) -> dict:
    import torch

    env = {"platform": platform.platform(), "device": str(device), "argv": sys.argv,
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def peak_rss_mb() -> int:
    """This process's peak resident memory so far, in MB (it never goes down)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
