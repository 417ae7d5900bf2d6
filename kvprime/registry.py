"""One registry class for everything kvprime finds by name: cache builders, surrogate sources, analyses and dataset
loaders. Each kind keeps one ``Registry`` instance beside its ``register_*`` decorator.

A registry is lazy: creating it imports nothing. The first lookup (``get``, ``names``, ``items``, ``in``,
iteration, ``len``) imports every module of the registry's packages (``pkgutil`` discovery, so a new module needs
no list kept by hand) and the installed ``kvprime.plugins`` entry points; each of those modules registers its
items as it is imported. A researcher's modules named in a run's ``plugins:`` register theirs the same way when
the run imports them. Registering never triggers discovery: the modules being discovered call it, and a module
registering a class is not done importing (a sibling discovered then could not import from it).

A name belongs to one definition. Registering a name that another module's definition holds is refused with a
``ConfigError`` naming both modules; the same definition registered again (its module imported a second time, as
a plugin loaded twice is) replaces the entry. ``origin`` says what the definition is when the registered item is
a wrapper (an info record around a function): the function or class whose module and qualified name identify it.
A name a plugin registered before discovery that a discovered module registers too is refused by every lookup
until one of the two goes (a failed discovery is retried by the next lookup).

Usage, by the kind's own module::

    ANALYSES: Registry[AnalysisInfo] = Registry("analysis", packages=("kvprime.analysis",), plural="analyses")

    def register_analysis(name):
        def wrap(fn):
            ANALYSES.register(name, AnalysisInfo(name, fn), origin=fn)
            return fn
        return wrap

    ANALYSES.get("exp01")       # the item, or a ConfigError listing the registered names, closest first
    "exp01" in ANALYSES, ANALYSES.names(), ANALYSES.items()
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
import threading
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")

ENTRY_POINT_GROUP = "kvprime.plugins"


def _origin_of(obj: object) -> tuple[str, str]:
    """(module, qualified name) of a definition: a function or class itself, an instance by its class."""
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return module, qualname


class Registry(Generic[T]):
    """Items of one kind by name, found by package discovery and entry points on first lookup (module docstring).

    ``kind`` names one item in messages ("builder"), ``plural`` several (default ``kind + "s"``); ``hint`` ends the
    unknown-name paragraph with what to do (how to register one). ``packages``: the packages whose every module is
    imported on first lookup. ``entry_point_group``: the entry points loaded then too (None: none)."""

    def __init__(self, kind: str, packages: Sequence[str] = (), *, plural: str | None = None, hint: str = "",
                 entry_point_group: str | None = ENTRY_POINT_GROUP):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.hint = hint
        self.packages = tuple(packages)
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._origins: dict[str, tuple[str, str]] = {}
        self._loaded = False
        # Re-entrant: a module imported during discovery may itself look items up.
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, packages={self.packages!r})"

    # ------------------------------------------------------------ registering

    def register(self, name: str, item: T, *, origin: object = None) -> T:
        """Add ``item`` under ``name`` and return it. ``origin``: the definition it comes from (default the item
        itself). Refuses a name another definition holds, naming both modules."""
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"a {self.kind} needs a non-empty name, got {name!r}.")
        new = _origin_of(item if origin is None else origin)
        with self._lock:
            old = self._origins.get(name)
            if old is not None and old != new:
                raise ConfigError(
                    f"{self.kind} {name!r} is registered twice: by {old[1]} in module {old[0]} and by {new[1]} in "
                    f"module {new[0]}. Each {self.kind} needs its own name: rename one of them.")
            self._items[name] = item
            self._origins[name] = new
        return item

    def unregister(self, name: str) -> T | None:
        """Remove ``name`` (tests that register throwaway items clean up with it); returns the item, or None."""
        with self._lock:
            self._origins.pop(name, None)
            return self._items.pop(name, None)

    # ------------------------------------------------------------ looking up (each loads the registry first)

    def get(self, name: str) -> T:
        """The item registered as ``name``; an unknown name is refused with one paragraph that lists the registered
        names, closest first."""
        self._load()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(self.unknown_message(name)) from None

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name in self._items

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, item) pairs in registration order."""
        self._load()
        return list(self._items.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def unknown_message(self, name: object) -> str:
        """The paragraph ``get`` raises for a name nobody registered: the registered names, closest first."""
        known = sorted(self._items)

        def closeness(candidate: str) -> float:
            return difflib.SequenceMatcher(None, str(name), candidate).ratio()

        ranked = sorted(known, key=lambda candidate: (-closeness(candidate), candidate))
        hint = f" {self.hint}" if self.hint else ""
        return (f"unknown {self.kind} {name!r}. Registered {self.plural}: {', '.join(ranked) or 'none'} (closest "
                f"first).{hint}")

    # ------------------------------------------------------------ discovery

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True  # set first: modules imported below register into, and may look up, this registry
            try:
                for package in self.packages:
                    self._import_modules(package)
                self._load_entry_points()
            except BaseException:
                self._loaded = False  # the next lookup tries again and reports the same problem
                raise

    @staticmethod
    def _import_modules(package: str) -> None:
        pkg = importlib.import_module(package)
        for module in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{module.name}")

    def _load_entry_points(self) -> None:
        if self.entry_point_group is None:
            return
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                ep.load()
            except ConfigError:
                raise
            except Exception as err:
                raise ConfigError(f"plugins: the installed entry point {ep.name!r} ({ep.value}) failed while "
                                  f"importing: {type(err).__name__}: {err}") from err
