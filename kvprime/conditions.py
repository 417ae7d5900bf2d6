"""A condition: which cache to build for a sample, with which surrogate, and how to score it.

Conditions are plain YAML files in ``conf/condition/``; an experiment composes several under
``conditions.<name>``. ``ConditionSpec`` is the validated, typed view of one. Validation needs no model,
so every config mistake is reported before weights load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .errors import ConfigError
from .segments import TEMPLATE_FIELDS, template_fields
from .surrogates import STATIC_SURROGATES, validate_source

ROPE_FIXES = ("none", "rerotate", "shift")


@dataclass(frozen=True)
class ConditionSpec:
    name: str
    builder: str = "full"
    surrogate: str = "none"
    rope_fix: str | None = None
    position_offset: int = 0
    random_tokens: int = 20
    prefix_template: str = ""
    document_template: str = "{document}"
    suffix_template: str = ""
    prompt_template: str = "\n\nQuestion: {query}\nAnswer:"
    answer_template: str = " {answer}"
    description: str = ""

    @classmethod
    def from_config(cls, name: str, cfg: Mapping) -> "ConditionSpec":
        data = dict(cfg)
        data.setdefault("name", name)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"condition {name!r} has unknown key(s) {unknown}. Accepted keys: "
                f"{', '.join(cls.__dataclass_fields__)}."
            )
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_surrogate(self) -> bool:
        return self.surrogate != "none"

    @property
    def truncates_prefix(self) -> bool:
        return self.builder == "truncate_prefix"


def validate(spec: ConditionSpec, builders: Mapping, static_set: Mapping[str, str] = STATIC_SURROGATES) -> None:
    """Raise one readable ValueError for the first thing wrong with a condition."""
    where = f"condition {spec.name!r}"
    if spec.builder not in builders:
        raise ConfigError(f"{where}: builder {spec.builder!r} is not registered. Registered builders: "
                         f"{', '.join(sorted(builders))}.")
    try:
        validate_source(spec.surrogate, static_set)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    if spec.builder == "truncate_prefix":
        if spec.rope_fix not in ROPE_FIXES:
            raise ConfigError(f"{where}: builder truncate_prefix needs rope_fix, one of {', '.join(ROPE_FIXES)}; "
                             f"got {spec.rope_fix!r}.")
    elif spec.rope_fix not in (None, "none"):
        raise ConfigError(f"{where}: rope_fix={spec.rope_fix!r} only applies to builder truncate_prefix "
                         f"(this condition uses {spec.builder!r}); remove it.")
    if not isinstance(spec.position_offset, int) or spec.position_offset < 0:
        raise ConfigError(f"{where}: position_offset must be a non-negative integer, got {spec.position_offset!r}.")
    if spec.surrogate == "random_tokens" and (not isinstance(spec.random_tokens, int) or spec.random_tokens < 1):
        raise ConfigError(f"{where}: random_tokens must be a positive integer, got {spec.random_tokens!r}.")
    for key, allowed in TEMPLATE_FIELDS.items():
        template = getattr(spec, key)
        try:
            used = template_fields(template)
        except ValueError as err:
            raise ConfigError(f"{where}: {key} {template!r} is not a valid format string ({err}).") from None
        extra = used - allowed
        if extra:
            raise ConfigError(f"{where}: {key} {template!r} uses {sorted(extra)}; it may only use "
                             f"{sorted('{' + f + '}' for f in allowed)}.")
    for key in ("document_template", "answer_template"):
        field = next(iter(TEMPLATE_FIELDS[key]))
        if field not in template_fields(getattr(spec, key)):
            raise ConfigError(f"{where}: {key} {getattr(spec, key)!r} must contain {{{field}}}.")
    needs_surrogate = "surrogate" in template_fields(spec.prefix_template) | template_fields(spec.suffix_template)
    if needs_surrogate and not spec.uses_surrogate:
        raise ConfigError(f"{where}: a template uses {{surrogate}} but surrogate is 'none'. Set surrogate to one "
                         "of query, random_query, random_tokens, static:<name>.")
    if spec.uses_surrogate and not needs_surrogate:
        raise ConfigError(f"{where}: surrogate={spec.surrogate!r} is set but neither prefix_template nor "
                         "suffix_template uses {surrogate}, so it would have no effect.")
    if spec.builder == "truncate_prefix" and not spec.prefix_template:
        raise ConfigError(f"{where}: builder truncate_prefix needs a non-empty prefix_template.")
    if spec.builder == "truncate_suffix" and not spec.suffix_template:
        raise ConfigError(f"{where}: builder truncate_suffix needs a non-empty suffix_template.")
    if not spec.prompt_template:
        raise ConfigError(f"{where}: prompt_template is empty; the first answer token is predicted by the "
                         "prompt's last position, so the prompt needs at least one token.")
