"""Where the YAML configs live and what each config group offers (no Hydra, no torch: cheap)."""

from __future__ import annotations

from pathlib import Path

# conf/ sits beside the package in the repository (installed with `pip install -e .`).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load(group: str, name: str):
    """One config of a group as an OmegaConf object; an unknown name lists the valid ones."""
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown {group} {name!r}. Valid {group} names: {', '.join(names(group))}.")
    cfg = OmegaConf.load(path)
    cfg.pop("defaults", None)
    return cfg
