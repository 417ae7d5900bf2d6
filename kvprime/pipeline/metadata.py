"""What a run directory records about where its numbers came from."""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

from ..config.confdir import INSTALLED_FROM_WHEEL

PACKAGES = ("kvprime", "torch", "transformers", "tokenizers", "accelerate", "hydra-core", "omegaconf", "numpy",
            "scipy", "pandas", "datasets", "sentence-transformers", "bitsandbytes")


def versions() -> dict:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    """The checkout's commit; none for a wheel install (its folder is site-packages, whose enclosing git
    repository, if any, is not kvprime's)."""
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


# Written when a run directory is first started (config.json's content stays the config alone: resume compares it),
# so a later kvprime that cannot resume it can say which kvprime to finish it with.
VERSION_FILE = "version.json"


def identity() -> dict:
    """Which kvprime this is: its version and, in a checkout, its git commit (and whether the tree had changes)."""
    try:
        version = importlib_metadata.version("kvprime")
    except importlib_metadata.PackageNotFoundError:
        version = None
    return {"kvprime": version, **git_state()}


def recorded_identity(run_dir: Path) -> dict | None:
    """The kvprime that started ``run_dir``: its version.json, else what a finished run's metadata.json says
    (directories from before version.json), else None (started and stopped by a kvprime that recorded neither)."""
    for name, pick in ((VERSION_FILE, lambda d: d),
                       ("metadata.json", lambda d: {"kvprime": (d.get("versions") or {}).get("kvprime"),
                                                    **(d.get("git") or {})})):
        try:
            found = json.loads((Path(run_dir) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict):  # anything else is not a record kvprime wrote
            return pick(found)
    return None


def describe(ident: Mapping | None) -> str:
    """The kvprime an ``identity`` or ``recorded_identity`` names, e.g. kvprime 0.1.0 (git commit 0123456789ab)."""
    if not ident:
        return "an older kvprime (it recorded neither its version nor its commit in the directory)"
    commit = ident.get("commit")
    where = f" (git commit {commit[:12]}{', with uncommitted changes' if ident.get('dirty') else ''})" if commit else ""
    return f"kvprime {ident.get('kvprime') or '(version unknown)'}{where}"


def how_to_get(then: Mapping | None, now: Mapping) -> str:
    """How to install the kvprime ``then`` describes again: its commit in a checkout, or its release (a release
    number this kvprime shares says nothing when the commit is known)."""
    how = []
    if then and then.get("commit"):
        how.append(f"`git checkout {then['commit']}` in the kvprime checkout")
    if then and then.get("kvprime") and (then["kvprime"] != now.get("kvprime") or not then.get("commit")):
        how.append(f"`pip install kvprime=={then['kvprime']}`")
    return " or ".join(how) if how else "the kvprime from before these settings were added"


def sample_ids_sha256(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def environment(device, argv: Sequence[str] | None = None) -> dict:
    """Where the run ran: the platform, the device, the command line (``argv``, default this process's) and torch's
    threads."""
    import torch  # lazy: torch; `kvprime merge` reads and joins run records through this module

    env = {"platform": platform.platform(), "device": str(device), "argv": list(sys.argv if argv is None else argv),
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def peak_rss_mb() -> int:
    """This process's peak resident memory so far, in MB (it never goes down)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
