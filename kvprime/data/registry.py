"""The dataset loader registry: each loader's function and the `dataset.<key>` options it declares.

A module of its own, importing nothing of kvprime's: the settings check reads the declared options from here,
while ``kvprime.data`` (which registers kvprime's loaders as the package is imported) uses the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

Loader = Callable[[Mapping], Iterable]  # cfg -> Sample | Rejection records
LOADERS: dict[str, Loader] = {}
# The dataset keys each loader reads beside the common ones (kvprime.config.compose.DATASET_KEYS); any other
# key is refused.
OPTIONS: dict[str, tuple[str, ...]] = {}


def register_loader(name: str, *, options: tuple[str, ...] = ()) -> Callable[[Loader], Loader]:
    """Decorator: make `fn` available as `dataset.name=<name>`. ``options``: the `dataset.<key>` settings it reads
    besides the common ones (n_samples, selection, ...); a key that neither declares is refused as a misspelling."""

    def deco(fn: Loader) -> Loader:
        if name in LOADERS and LOADERS[name] is not fn:
            raise ValueError(f"A dataset loader named {name!r} is already registered.")
        LOADERS[name] = fn
        OPTIONS[name] = tuple(options)
        return fn

    return deco
