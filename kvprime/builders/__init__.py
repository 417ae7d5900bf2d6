"""The condition -> cache layer: the cache-builder registry and the ``Builder`` base class (here), kvprime's
builders (``library/``), the condition spec (``conditions``), the engine that runs builders (``engine``) and the
numerical floor probe that builds re-rotated caches (``floor``). A builder is one module that registers itself;
nothing else needs an edit.

A builder is a subclass of ``Builder`` registered with the class decorator ``@register_builder(name)``. Its two
methods are required (a class missing either is refused when it registers):

- ``plan(seg, spec) -> list[EncodeRequest]``: the encodes its ``build`` will ask the engine for. The engine runs a
  chunk of samples' planned encodes as padded batches first, so ``build`` finds them memoised;
- ``build(engine, seg, spec) -> PrimedCache``: the cache, from ``engine.encode`` of the planned requests.

and its declarations are class attributes (all optional):

- ``params``: a dataclass of its own settings (defaults, accepted values in ``validate()``). A condition's
  YAML keys that are not common condition keys are checked against it before any model loads.
  ``rope_fix``, if the dataclass has it, is the RoPE correction the model must support (checked from the
  model's config, before weights load).
- ``roles``: what it does with each span kind (``{"prefix": "cut"}``); the engine renders segments with them.
- ``refuses``: ``{template key: why}`` for the condition templates it cannot honour (``{"suffix_template":
  "..."}``); a condition that sets one is refused before any model loads, with the reason.
- ``surrogate_per_document``: the builder primes each document of a multi-passage sample on its own, so a
  generated surrogate is written for each passage (one prefix span before each document) rather than only
  for the sample's gold passage.

and two optional methods: ``notes(params) -> str | None``, a sentence for the report on conditions built this way
(stored in the run's plan.json, so ``kvprime report`` needs no builder code), and ``extra_context(seg, params)``,
the cache entries it holds beyond the sample's spans (the context check adds them). The class docstring's first
line is what ``kvprime conditions`` shows.

kvprime's own builders are the modules of ``kvprime.builders.library``, found by ``pkgutil`` when the registry is
first read (``kvprime.registry``); a researcher's builders are modules named in the run's ``plugins:`` list
(``kvprime.config.plugins``), or ``kvprime.plugins`` entry points.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:  # for annotations only: the builders' registry and this module load without torch
    from transformers import DynamicCache


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A builder without settings of its own."""


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

    cache: DynamicCache
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


class Builder(ABC):
    """A cache builder: its plan (the encodes it asks for) and its build, with its declarations (module docstring).
    One instance per registered name; ``name`` is set when it registers."""

    name: str = ""
    params: ClassVar[type] = NoParams
    roles: ClassVar[Mapping[str, str]] = MappingProxyType({})
    refuses: ClassVar[Mapping[str, str]] = MappingProxyType({})
    surrogate_per_document: ClassVar[bool] = False

    @abstractmethod
    def plan(self, seg, spec) -> list[EncodeRequest]:
        """The encodes ``build`` will ask for, so that a chunk's encodes run as padded batches before building."""

    @abstractmethod
    def build(self, engine, seg, spec) -> PrimedCache:
        """The condition's cache for one sample's segments."""

    def notes(self, params) -> str | None:
        """A sentence for the report on conditions built this way (None: nothing to say)."""
        return None

    def extra_context(self, seg, params) -> int:
        """Cache entries beyond the sample's spans (counted by the engine's context check)."""
        return 0

    @property
    def doc(self) -> str:
        """The first line of the class docstring (``kvprime conditions`` lists it)."""
        text = (type(self).__doc__ or "").strip()
        return text.splitlines()[0] if text else ""

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


BUILDERS: Registry[Builder] = Registry(
    "builder", packages=(f"{__name__}.library",),
    hint="A builder is a Builder subclass registered with @register_builder(name) in a module named in plugins: "
         "[...].")

_SPELLING = ("a builder is a class deriving from kvprime.builders.Builder, with plan(seg, spec) -> "
             "list[EncodeRequest] (the encodes its build asks for, run as padded batches) and build(engine, seg, "
             "spec) -> PrimedCache, its declarations (params, roles, refuses, surrogate_per_document) as class "
             "attributes, registered with @register_builder(name) on the class")


def register_builder(name: str, **declarations):
    """Class decorator: register a ``Builder`` subclass as ``builder: <name>``. Refused, in one paragraph: a
    class without ``plan`` or ``build``, a function, params that are not a dataclass, declarations given as
    keywords."""
    if declarations:
        raise ConfigError(f"builder {name!r}: register_builder takes the name only, got {', '.join(declarations)}; "
                          f"{_SPELLING}.")

    def wrap(cls):
        BUILDERS.register(name, _instantiate(name, cls), origin=cls)
        return cls
    return wrap


def _instantiate(name: str, cls) -> Builder:
    where = f"builder {name!r} ({getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s})"
    if not (isinstance(cls, type) and issubclass(cls, Builder)):
        raise ConfigError(f"{where} is not a Builder subclass: {_SPELLING}.")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ConfigError(f"{where} has no {' and no '.join(missing)}: {_SPELLING}.")
    if not dataclasses.is_dataclass(cls.params):
        raise ConfigError(f"{where}: params must be a dataclass, got {cls.params!r}.")
    builder = cls()
    builder.name = name
    return builder
