"""The dataset loader registry: each loader's function and the `dataset.<key>` options it declares.

A module of its own, importing nothing of kvprime's but the generic registry: the settings check reads the declared
options from here, while ``kvprime.data`` uses the settings. kvprime's own loaders are the modules of
``kvprime.data``, found by ``pkgutil`` when the registry is first read (``kvprime.registry``); a researcher's are
modules named in the run's ``plugins:`` list, or ``kvprime.plugins`` entry points.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from ..registry import Registry

Loader = Callable[[Mapping], Iterable]  # cfg -> Sample | Rejection records


@dataclass(frozen=True)
class LoaderInfo:
    name: str
    load: Loader
    # The dataset keys the loader reads beside the common ones (kvprime.config.compose.DATASET_KEYS); any other key
    # is refused.
    options: tuple[str, ...] = ()


REGISTRY: Registry[LoaderInfo] = Registry(
    "dataset loader", packages=(__package__,),
    hint="Set dataset.name to one of them, or register yours with @register_loader (kvprime.data) in a module named "
         "in plugins: [...].")


def register_loader(name: str, *, options: tuple[str, ...] = ()) -> Callable[[Loader], Loader]:
    """Decorator: make `fn` available as `dataset.name=<name>`. ``options``: the `dataset.<key>` settings it reads
    besides the common ones (n_samples, selection, ...); a key that neither declares is refused as a misspelling."""

    def deco(fn: Loader) -> Loader:
        REGISTRY.register(name, LoaderInfo(name, fn, tuple(options)), origin=fn)
        return fn

    return deco


class _Field(Mapping):
    """A read-only view of one field of every registered loader, by name: ``LOADERS`` (the functions) and
    ``OPTIONS`` (the declared options), as callers that take a mapping of loader names read them. ``pop`` removes
    the loader from the registry (tests that register throwaway loaders clean up with it)."""

    def __init__(self, field: str):
        self._field = field

    def __getitem__(self, name: str):
        if name not in REGISTRY:
            raise KeyError(name)
        return getattr(REGISTRY.get(name), self._field)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY.names())

    def __len__(self) -> int:
        return len(REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in REGISTRY

    def pop(self, name: str, default=None):
        info = REGISTRY.unregister(name)
        return default if info is None else getattr(info, self._field)


LOADERS: Mapping[str, Loader] = _Field("load")
OPTIONS: Mapping[str, tuple[str, ...]] = _Field("options")
