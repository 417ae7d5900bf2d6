"""Where the YAML configs live and what each config group offers (no Hydra, no torch: cheap)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

# conf/ and outputs/ sit beside the package in the repository (installed with `pip install -e .`).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OUTPUTS_DIR = CONF_DIR.parent / "outputs"


def outputs_root() -> str:
    """Where run directories go: $KVPRIME_OUTPUT_ROOT, else the project's outputs/ whatever the cwd is."""
    return os.path.abspath(os.path.expanduser(os.environ.get("KVPRIME_OUTPUT_ROOT") or str(OUTPUTS_DIR)))


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    from .rundir import new_run_dir

    OmegaConf.register_new_resolver("kvprime_outputs", outputs_root, replace=True)
    # Cached per config (and copied into every job of a sweep), so one run resolves one directory.
    OmegaConf.register_new_resolver("kvprime_new_dir", new_run_dir, replace=True, use_cache=True)


def names(group: str) -> list[str]:
    """Config names of a group, sub-folders included ("exp01/A1_baseline")."""
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def load(group: str, name: str):
    """One config of a group as an OmegaConf object; an unknown name lists the valid ones."""
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} {name!r}. Valid {group} names: {', '.join(names(group))}.")
    cfg = OmegaConf.load(path)
    cfg.pop("defaults", None)
    return cfg
