"""A condition: which cache to build for a sample, with which surrogate, and how to score it.

Conditions are plain YAML files in ``conf/condition/``; an experiment composes several under
``conditions.<name>``. ``ConditionSpec`` is the validated, typed view of one. Validation needs no model,
so every config mistake is reported before weights load. Whether a condition's surrogate source exists is
the surrogates' to say (``kvprime.surrogates.sources``): the caller that plans a run passes that check in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from ..cache.segments import TEMPLATE_FIELDS, template_fields
from ..errors import ConfigError
from ..registry import Registry
from . import BUILDERS, Builder


@dataclass(frozen=True, init=False)
class ConditionSpec:
    """Keys every condition has; any other key of a condition's YAML is a setting of its builder (``params``,
    checked against the builder's own dataclass by ``validate``)."""

    name: str
    builder: str = "full"
    surrogate: str = "none"
    position_offset: int = 0
    random_tokens: int = 20
    prefix_template: str = ""
    document_template: str = "{document}"
    suffix_template: str = ""
    prompt_template: str = "\n\nQuestion: {query}\nAnswer:"
    answer_template: str = " {answer}"
    description: str = ""
    params: tuple = ()  # the builder's settings as (key, value) pairs, in the order given

    def __init__(self, name: str, builder: str = "full", surrogate: str = "none", position_offset: int = 0,
                 random_tokens: int = 20, prefix_template: str = "", document_template: str = "{document}",
                 suffix_template: str = "", prompt_template: str = "\n\nQuestion: {query}\nAnswer:",
                 answer_template: str = " {answer}", description: str = "", params=(), **builder_params):
        """Builder settings may be given as keywords (``ConditionSpec("d", builder="truncate_prefix",
        rope_fix="shift")``) or as ``params``."""
        values = dict(locals())
        for key in self.common_keys():
            object.__setattr__(self, key, values[key])
        object.__setattr__(self, "params", tuple({**dict(params), **builder_params}.items()))

    @classmethod
    def common_keys(cls) -> tuple[str, ...]:
        return tuple(f for f in cls.__dataclass_fields__ if f != "params")

    @classmethod
    def from_config(cls, name: str, cfg: Mapping) -> ConditionSpec:
        data = dict(cfg)
        data.setdefault("name", name)
        common = {k: v for k, v in data.items() if k in cls.common_keys()}
        rest = {k: v for k, v in data.items() if k not in cls.common_keys()}
        builder = common.get("builder", "full")
        if builder in BUILDERS:  # an unknown builder is validate()'s to report, naming the registered ones
            info = BUILDERS[builder]
            # A key set to null that the builder does not know says "not set" (e.g. rope_fix: null on a full cache).
            rest = {k: v for k, v in rest.items() if v is not None or k in info.param_names()}
            unknown = sorted(set(rest) - set(info.param_names()))
            if unknown:
                raise ConfigError(
                    f"condition {name!r} has unknown key(s) {unknown}. Accepted keys: {', '.join(cls.common_keys())}"
                    f", and the settings of builder {info.name!r}: {', '.join(info.param_names()) or 'none'}.")
        return cls(**common, params=tuple(rest.items()))

    @property
    def builder_params(self) -> dict:
        return dict(self.params)

    @property
    def settings(self):
        """The builder's own settings as its checked params dataclass (defaults filled in)."""
        return builder_of(self).make_params(self.builder_params, f"condition {self.name!r}")

    @property
    def rope_fix(self) -> str | None:
        return self.builder_params.get("rope_fix")

    def to_dict(self) -> dict:
        """Flat, as in the YAML (``rope_fix`` always present, as the run directories have always had it)."""
        out = {}
        for k, v in asdict(self).items():
            if k == "position_offset":
                out["rope_fix"] = self.rope_fix  # where run directories have always had it
            if k != "params":
                out[k] = v
        out.update({k: v for k, v in self.builder_params.items() if k != "rope_fix"})
        return out

    @property
    def uses_surrogate(self) -> bool:
        return self.surrogate != "none"


def builder_of(spec: ConditionSpec, builders: Registry[Builder] = BUILDERS) -> Builder:
    """The condition's builder; an unknown one is refused naming the condition and the registered builders."""
    try:
        return builders.get(spec.builder)
    except ConfigError as err:
        raise ConfigError(f"condition {spec.name!r}: {err}") from None


def validate(spec: ConditionSpec, builders: Registry[Builder] = BUILDERS,
             check_source: Callable[[str], None] | None = None) -> None:
    """Raise one readable ValueError for the first thing wrong with a condition. ``check_source(surrogate)``
    raises a ValueError for a surrogate source that does not exist (``kvprime.surrogates.sources``)."""
    where = f"condition {spec.name!r}"
    info = builder_of(spec, builders)
    if check_source is not None:
        try:
            check_source(spec.surrogate)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    info.make_params(spec.builder_params, where)
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
    for key, why in info.refuses.items():
        if getattr(spec, key, None):
            raise ConfigError(f"{where}: builder {spec.builder} takes no {key} (got {getattr(spec, key)!r}): {why}")
    for kind, role in info.roles.items():  # a builder that cuts or masks a span needs that span
        if role != "kept" and kind in ("prefix", "suffix") and not getattr(spec, f"{kind}_template"):
            raise ConfigError(f"{where}: builder {spec.builder} needs a non-empty {kind}_template.")
    if not spec.prompt_template:
        raise ConfigError(f"{where}: prompt_template is empty; the first answer token is predicted by the "
                         "prompt's last position, so the prompt needs at least one token.")


def builder_notes(specs: Mapping) -> list[str]:
    """Each builder's sentence for the report on the conditions it builds (stored in plan.json, so the report
    needs no builder code), once per distinct sentence, in condition order."""
    notes = []
    for spec in specs.values():
        info = BUILDERS[spec.builder]
        text = info.notes(info.make_params(spec.builder_params, f"condition {spec.name!r}"))
        if text and text not in notes:
            notes.append(text)
    return notes
