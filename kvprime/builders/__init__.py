"""Cache builders: name -> function(engine, segments, spec) -> PrimedCache.

To add one, write a small module in this package that decorates its function with
``@register_builder("name")``, import it at the bottom of this file, and point a condition YAML's
``builder:`` at the name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError

BUILDERS: dict[str, Callable] = {}
BUILDER_DOCS: dict[str, str] = {}
# Optional: name -> function(seg, spec) -> list[EncodeRequest], the encodes the builder will ask for. With it
# the engine runs a chunk of samples' encodes as padded batches before building; without it, a builder's
# encodes simply run one at a time when it asks for them.
PLANNERS: dict[str, Callable] = {}


def register_builder(name: str):
    def wrap(fn):
        if name in BUILDERS:
            raise ConfigError(f"cache builder {name!r} is registered twice")
        BUILDERS[name] = fn
        BUILDER_DOCS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
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
    """A built cache and the facts needed to trust it: which token ids it holds, at which RoPE positions
    its keys are rotated, and the position scoring continues from."""

    cache: object  # transformers DynamicCache
    token_ids: list[int]
    position_ids: list[int]
    next_position: int
    kept_segments: tuple[str, ...]
    encoded_tokens: int  # tokens the model processed to build it (prefix/suffix included)
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)


from . import full, truncate_prefix, truncate_suffix  # noqa: E402,F401  (registration)
