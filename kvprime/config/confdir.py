"""Where the YAML configs live, what each config group offers, and what composing them needs registered (no torch:
cheap).

Two ways kvprime is installed, two places for conf/ and outputs/:

- From a checkout (``pip install -e .``, what ``make setup`` does): the configs are the checkout's top-level
  ``conf/``, and run directories go to the checkout's ``outputs/``, whatever the current directory.
- From a wheel (``pip install kvprime-*.whl``): the configs are the copy of ``conf/`` shipped inside the
  package (``kvprime/conf/``, mapped in pyproject.toml), and, there being no project folder, run directories
  go to ``./outputs`` under the current directory at the time of the call.

``KVPRIME_OUTPUT_ROOT`` overrides the outputs folder in both cases.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..files.rundir import new_run_dir
from . import schema

_PACKAGED_CONF = Path(__file__).resolve().parents[1] / "conf"  # a wheel install: kvprime/conf/
_CHECKOUT = Path(__file__).resolve().parents[2]  # an editable install: the repository
# The packaged copy is looked for first: beside an installed package sits site-packages, whose conf/ (if any
# other distribution made one) is not ours.
INSTALLED_FROM_WHEEL = _PACKAGED_CONF.is_dir()
CONF_DIR = _PACKAGED_CONF if INSTALLED_FROM_WHEEL else _CHECKOUT / "conf"
# Relative for a wheel install: resolved against the current directory by outputs_root().
OUTPUTS_DIR = Path("outputs") if INSTALLED_FROM_WHEEL else _CHECKOUT / "outputs"


def outputs_root() -> str:
    """Where run directories go: $KVPRIME_OUTPUT_ROOT, else the checkout's outputs/ whatever the cwd is (an
    editable install), else ./outputs under the current directory (a wheel install)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("KVPRIME_OUTPUT_ROOT") or str(OUTPUTS_DIR)))


def register_resolvers() -> None:
    """Register what conf/config.yaml relies on, before Hydra composes it: its resolvers and the structured config
    its defaults list names (kvprime.config.schema)."""
    schema.register()
    OmegaConf.register_new_resolver("kvprime_outputs", outputs_root, replace=True)
    # Cached per config (and copied into every job of a sweep), so one run resolves one directory.
    OmegaConf.register_new_resolver("kvprime_new_dir", new_run_dir, replace=True, use_cache=True)


def names(group: str) -> list[str]:
    """Config names of a group, sub-folders included ("exp01/A1_baseline")."""
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def load(group: str, name: str) -> DictConfig:
    """One config of a group as an OmegaConf object; an unknown name lists the valid ones."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} {name!r}. Valid {group} names: {', '.join(names(group))}.")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} holds a {type(cfg).__name__}, not settings: a {group} config is a mapping of "
                          f"setting names to values (as the other files in {path.parent} are).")
    cfg.pop("defaults", None)
    return cfg


def resolved(cfg: DictConfig) -> dict:
    """A mapping config as plain Python values, interpolations resolved."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)  # a DictConfig's container is a dict
    return out
