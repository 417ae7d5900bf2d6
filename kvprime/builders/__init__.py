"""The condition -> cache layer: the cache-builder registry (here), kvprime's builders (``library/``), the
condition spec (``conditions``), the engine that runs builders (``engine``) and the numerical floor probe that
builds re-rotated caches (``floor``). A builder is one module that registers itself; nothing else needs an edit.

A builder declares, with ``@register_builder(name, params=..., roles=..., notes=...)``:

- ``params``: a dataclass of its own settings (defaults, accepted values in ``validate()``). A condition's
  YAML keys that are not common condition keys are checked against it before any model loads.
  ``rope_fix``, if the dataclass has it, is the RoPE correction the model must support (checked from the
  model's config, before weights load).
- ``roles``: what it does with each span kind (``{"prefix": "cut"}``); the engine renders segments with them.
- ``notes``: ``fn(params) -> str | None``, a sentence for the report on conditions built this way (stored in
  the run's plan.json, so ``kvprime report`` needs no builder code).
- ``refuses``: ``{template key: why}`` for the condition templates it cannot honour (``{"suffix_template":
  "..."}``); a condition that sets one is refused before any model loads, with the reason.
- ``surrogate_per_document``: the builder primes each document of a multi-passage sample on its own, so a
  generated surrogate is written for each passage (one prefix span before each document) rather than only
  for the sample's gold passage.
- the build function ``fn(engine, segments, spec) -> PrimedCache``, and optionally a planner
  (``@register_planner(name)``: the encodes it will ask for, so a chunk's encodes run as padded batches).

kvprime's own builders are the modules of ``kvprime.builders.library``, found by ``pkgutil`` (the other modules of
this package are not builders); a researcher's builders are modules named in the run's ``plugins:`` list
(``kvprime.config.plugins``), or ``kvprime.plugins`` entry points.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A builder without settings of its own."""


@dataclass(frozen=True)
class BuilderInfo:
    name: str
    build: Callable
    params: type = NoParams
    roles: dict = field(default_factory=dict)
    notes: Callable | None = None
    doc: str = ""
    surrogate_per_document: bool = False
    refuses: dict = field(default_factory=dict)

    def param_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.params))

    def make_params(self, values: dict, where: str):
        """The builder's params from a condition's keys, checked (unknown keys, then ``validate()``)."""
        unknown = sorted(set(values) - set(self.param_names()))
        if unknown:
            raise ConfigError(f"{where}: builder {self.name!r} has no setting {', '.join(unknown)}. Its settings: "
                              f"{', '.join(self.param_names()) or 'none'}.")
        try:
            params = self.params(**values)
        except TypeError as err:
            raise ConfigError(f"{where}: builder {self.name!r}: {err}.") from None
        check = getattr(params, "validate", None)
        if check is not None:
            try:
                check()
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        return params

    def rope_fix(self, params) -> str | None:
        """The RoPE correction these params need from the model (None: the builder moves no key)."""
        return getattr(params, "rope_fix", None)


BUILDERS: dict[str, BuilderInfo] = {}
# Optional: name -> function(seg, spec) -> list[EncodeRequest], the encodes the builder will ask for. With it
# the engine runs a chunk of samples' encodes as padded batches before building; without it, a builder's
# encodes simply run one at a time when it asks for them.
PLANNERS: dict[str, Callable] = {}


def register_builder(name: str, *, params: type = NoParams, roles: dict | None = None,
                     notes: Callable | None = None, surrogate_per_document: bool = False,
                     refuses: dict | None = None):
    if not dataclasses.is_dataclass(params):
        raise ConfigError(f"cache builder {name!r}: params must be a dataclass, got {params!r}.")

    def wrap(fn):
        if name in BUILDERS and BUILDERS[name].build is not fn:
            raise ConfigError(f"cache builder {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        BUILDERS[name] = BuilderInfo(name, fn, params, dict(roles or {}), notes, doc, surrogate_per_document,
                                     dict(refuses or {}))
        return fn
    return wrap


def register_planner(name: str):
    def wrap(fn):
        PLANNERS[name] = fn
        return fn
    return wrap


@dataclass(frozen=True)
class EncodeRequest:
    ids: tuple[int, ...]
    positions: tuple[int, ...]
    keep: bool = False  # the same for every sample (the sink alone): kept across samples

    @property
    def key(self):
        return (self.ids, self.positions[0], len(self.positions))


@dataclass
class PrimedCache:
    """A built cache and the facts needed to trust it, per entry: its token id, the RoPE position its key is
    rotated for, and whether scoring may attend to it (``attend``; None: every entry). Scoring continues
    from ``next_position``."""

    cache: object  # transformers DynamicCache
    token_ids: list[int]
    position_ids: list[int]
    next_position: int
    kept_segments: tuple[str, ...]
    encoded_tokens: int  # tokens the model processed to build it (prefix/suffix included)
    notes: dict = field(default_factory=dict)
    attend: list[bool] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def masked(self) -> bool:
        return self.attend is not None and not all(self.attend)


def _discover() -> None:
    """Import every module of ``library/``: each registers its builder."""
    library = importlib.import_module(f"{__name__}.library")
    for mod in pkgutil.iter_modules(library.__path__):
        importlib.import_module(f"{library.__name__}.{mod.name}")


_discover()
