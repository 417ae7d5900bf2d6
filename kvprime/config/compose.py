"""Compose kvprime's Hydra config from command-line overrides, outside a Hydra app.

``kvprime run`` is a Hydra app; ``inspect``, ``walkthrough``, ``bench``, ``surrogates generate``, the tests and
notebooks compose the same ``conf/`` here. A command's own choices (the walkthrough's experiment, the bench's
sample count) are defaults that the user's overrides replace. No torch is imported: composing is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence


def override_key(arg: str) -> str:
    """The setting an override names: ``+dataset.n_samples=5`` and ``dataset.n_samples=5`` both name
    ``dataset.n_samples``; ``~experiment`` names ``experiment``."""
    return arg.lstrip("+~").split("=", 1)[0].strip()


def with_defaults(defaults: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``defaults`` the user did not override, then the user's ``overrides``.

    Hydra lets the last of two values win, but dropping the default outright means a command's choice never
    mixes with the user's (``+key=`` after ``key=``, or ``~key``, would otherwise fail or add to it)."""
    given = {override_key(a) for a in overrides}
    return [d for d in defaults if override_key(d) not in given] + list(overrides)


def compose(overrides: Sequence[str], defaults: Sequence[str] = ()) -> dict:
    """The resolved config (a plain dict) for ``overrides`` on top of ``defaults``, as ``kvprime run``
    composes it (run-directory settings aside)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from .confdir import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=with_defaults(defaults, overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def pop_arg(args: list[str], key: str) -> str | None:
    """Remove a command's own ``key=value`` argument (e.g. ``sample=``) from ``args``, which are otherwise
    Hydra overrides, and return its value."""
    for a in list(args):
        if a.startswith(key + "="):
            args.remove(a)
            return a.split("=", 1)[1]
    return None
