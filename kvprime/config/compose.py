"""Compose kvprime's Hydra config from command-line overrides, outside a Hydra app, and say which keys a composed
config may hold.

``kvprime run`` is a Hydra app; ``inspect``, ``walkthrough``, ``bench``, ``surrogates generate``, the tests and
notebooks compose the same ``conf/`` here. A command's own choices (the walkthrough's experiment, the bench's
sample count) are defaults that the user's overrides replace. No torch is imported: composing is cheap.

Hydra lets any key in with ``+key=value`` (and a YAML file may hold any), but kvprime reads only the keys it
declares; another one, a misspelling most often, would be ignored without a word. So every key of a composed
config is checked (``unknown_in``, called by ``kvprime.config.settings.check``): the run-level settings are declared
in ``kvprime.config.schema``, the keys of the groups ``conf/`` composes here, a dataset loader's options where it
registers (``kvprime.data.registry``; the data layer sits above this one, so its callers pass the registered
loaders' options in as ``loader_options``), a builder's where it registers (checked with the conditions).

Hydra composes on kvprime's structured config (``kvprime.config.schema``), so OmegaConf refuses some values and keys
itself while composing; ``user_error`` gives those refusals kvprime's own paragraphs, for ``compose`` here and for
the command line's failure handler.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import ConfigError
from . import confdir, schema
from .confdir import CONF_DIR

# The keys of a run config besides the run-level settings: the groups that conf/ composes.
GROUPS = ("model", "dataset", "experiment", "condition", "conditions")
# Every model key kvprime reads (kvprime.models.loading, kvprime.models.shape_random, kvprime.cache.tiny; hub_id:
# model.id's older name). A key a source does not use is harmless (hf_local's compute_dtype without quantization),
# so the set is not per source.
MODEL_KEYS = ("name", "source", "asset", "path", "id", "hub_id", "revision", "dtype", "compute_dtype", "device",
              "quantization", "device_map", "attn_implementation", "sink", "max_context", "arch", "seed", "overrides",
              "tokenizer", "config")
# Every experiment key kvprime reads (kvprime.pipeline.plan, kvprime.reporting, kvprime.analysis, the commands).
EXPERIMENT_KEYS = ("name", "title", "description", "baseline", "comparisons", "diagnosis", "inspect", "analyses",
                   "similarity", "similarity_condition", "derived", "cache_variant", "parity")
# The dataset keys every loader shares (kvprime.data.load_samples); a loader adds its own options.
DATASET_KEYS = ("name", "n_samples", "selection", "seed", "filters", "group_by_passage")
# How a key becomes one kvprime knows: said in every refusal of an unknown key, since `+key=value` cannot do it.
ADD_A_KEY = ("A key is known only when the code that reads it declares it: your own code's settings come with a "
             "plugin (plugins=[...]; docs/extending.md), as fields of its builder's params dataclass (keys of a "
             "condition) or its loader's register_loader(name, options=(...)) (keys of dataset).")


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


def compose(overrides: Sequence[str], defaults: Sequence[str] = (), *,
            loader_options: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The resolved config (a plain dict) for ``overrides`` on top of ``defaults``, as ``kvprime run``
    composes it (run-directory settings aside). A value or key Hydra refuses raises ``ConfigError`` with kvprime's
    paragraph (``user_error``; ``loader_options`` as there)."""
    schema.register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=with_defaults(defaults, overrides))
    except (HydraException, OmegaConfBaseException) as err:
        mine = user_error(err, loader_options)
        if mine is None:
            raise
        raise ConfigError(mine) from err
    return confdir.resolved(cfg)


def declared() -> dict[str | None, tuple[str, ...]]:
    """The keys of the top level (None) and of every section whose keys the schema declares all of."""
    top = tuple(dict.fromkeys(k.split(".", 1)[0] for k in schema.SPECS)) + tuple(g for g in GROUPS
                                                                                if g not in schema.SPECS)
    return {None: top, **{s: tuple(k.split(".")[1] for k in schema.SPECS if k.startswith(s + "."))
                           for s in schema.CLOSED_SECTIONS}}


def pop_arg(args: list[str], key: str) -> str | None:
    """Remove a command's own ``key=value`` argument (e.g. ``sample=``) from ``args``, which are otherwise
    Hydra overrides, and return its value."""
    for a in list(args):
        if a.startswith(key + "="):
            args.remove(a)
            return a.split("=", 1)[1]
    return None


def unknown_key(key: str, shown: str | None, accepted: Sequence[str], place: str | None = None,
                source: str | None = None) -> str:
    """The paragraph for ``key`` (dotted), which kvprime does not read, given the value ``shown``; ``accepted``: the
    keys its section takes (the closest to ``key`` are named first); ``place``: the section in words; ``source``:
    the config that set it, named where the value is not known (``shown`` None)."""
    section, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, list(accepted), n=3, cutoff=0.6)
    ordered = close + [k for k in accepted if k not in close]
    place = place or section or "the top level of the config"
    guess = f" Did you mean {section + '.' if section else ''}{close[0]}?" if close else ""
    head = f"{key}={shown}" if shown is not None else f"{key} (set in {source or 'a config'})"
    return (f"{head} is not accepted: kvprime reads no key {name!r} in {place}, so the value would be ignored "
            f"without a word (a + on the command line adds a key to the config, not to what kvprime reads).{guess} "
            f"Accepted in {place}: {', '.join(ordered) or 'none'}. {ADD_A_KEY}")


def unknown_keys(section: str | None, holder: Mapping, accepted: Sequence[str], show: Callable[[object], str] = repr,
                 place: str | None = None) -> list[str]:
    """An ``unknown_key`` paragraph for each key of ``holder`` (the section ``section``; None: the top level) that
    is not in ``accepted``; ``show`` writes a value as the config spells it."""
    prefix = f"{section}." if section else ""
    return [unknown_key(prefix + str(k), show(v), accepted, place) for k, v in holder.items() if k not in accepted]


def refuse(problems: Sequence[str], origin: str | None = None) -> None:
    """Raise one ``ConfigError`` holding every paragraph of ``problems`` (nothing when there is none); ``origin``
    (e.g. a config.json path) is named."""
    if len(problems) == 1:
        raise ConfigError(problems[0] + (f" It was read from {origin}." if origin else ""))
    if problems:
        where = f" (in {origin})" if origin else ""
        raise ConfigError(f"{len(problems)} settings are not accepted{where}:\n" + "\n".join(problems))


def dataset_keys(dataset: Mapping, loader_options: Mapping[str, Sequence[str]]) -> tuple[tuple[str, ...], str] | None:
    """(accepted keys, the section in words) of a dataset config whose loader is registered (``loader_options``: each
    registered loader's declared options, ``kvprime.data.OPTIONS``): the common keys, then the loader's declared
    options. None for another loader (a plugin's registers when the run's plugins are imported, after the settings
    check: kvprime.data.load_samples checks its keys then)."""
    name = dataset.get("name")
    if not isinstance(name, str) or name not in loader_options:
        return None
    options = tuple(k for k in loader_options[name] if k not in DATASET_KEYS)
    return DATASET_KEYS + options, f"dataset (loader {name!r})"


def _unselected_condition(cfg: Mapping, show: Callable[[object], str]) -> list[str]:
    key, value = next(iter(cfg["condition"].items()))
    return [f"condition.{key}={show(value)} is not accepted: no condition is selected for this command, so condition.* "
            "would be ignored without a word. To run one condition (with the baseline), select it: `kvprime run "
            "condition=<name>` (a file of conf/condition), then condition.<key>=... changes it; to change a condition "
            f"of the experiment, set conditions.<name>.<key>=... (its conditions: "
            f"{', '.join(cfg.get('conditions') or {}) or 'none'})."]


def unknown_in(cfg: Mapping, declared: Mapping[str | None, Sequence[str]], show: Callable[[object], str], *,
               wanted: set | None = None, condition_selected: bool | None = None,
               loader_options: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """A paragraph for every key of the run config ``cfg`` that kvprime does not read. ``declared``: the keys of the
    top level (None) and of the sections the settings declare whole; ``wanted``: the top-level names to judge
    (None: all, the top level included); ``condition_selected`` False: condition.* keys are refused too;
    ``loader_options``: the registered dataset loaders' options (None: dataset keys are left to load_samples)."""
    sections: dict[str, tuple[Sequence[str], str | None]] = {
        sec: (keys, None) for sec, keys in declared.items() if sec is not None}
    sections.update(model=(MODEL_KEYS, None), experiment=(EXPERIMENT_KEYS, None))
    dataset = cfg.get("dataset")
    loader_keys = dataset_keys(dataset, loader_options) if loader_options is not None and isinstance(
        dataset, Mapping) else None
    if loader_keys:
        sections["dataset"] = loader_keys
    problems = [] if wanted is not None else unknown_keys(None, cfg, declared[None], show)
    for sec, (accepted, place) in sections.items():
        if (wanted is None or sec in wanted) and isinstance(cfg.get(sec), Mapping):
            problems += unknown_keys(sec, cfg[sec], accepted, show, place)
    if condition_selected is False and isinstance(cfg.get("condition"), Mapping) and cfg["condition"]:
        problems += _unselected_condition(cfg, show)
    return problems


def not_in_config(key: str, value: str, declared: Mapping[str | None, Sequence[str]],
                  loader_options: Mapping[str, Sequence[str]]) -> str | None:
    """The paragraph for ``key=value`` (as typed) that Hydra refused because the composed config has no ``key``,
    before kvprime saw the config, where Hydra's own hint (``+key=value``) would only meet ``unknown_in``'s refusal:
    a top-level key, or one of a section whose keys kvprime declares (settings, model, experiment, dataset). None
    where ``+`` is the way to add a key kvprime reads (a builder's param in a condition, model.overrides.*, ...).
    For dataset, every registered loader's options count (``loader_options``, ``kvprime.data.OPTIONS``; which loader
    is selected is not known here)."""
    section, _, name = key.rpartition(".")
    options: tuple[str, ...] = ()
    if section == "dataset":
        options = tuple(k for loader in sorted(loader_options) for k in loader_options[loader])
    accepted = {**declared, "model": MODEL_KEYS, "experiment": EXPERIMENT_KEYS, "dataset": DATASET_KEYS + options}
    if (section or None) not in accepted:
        return None
    if name in accepted[section or None]:  # a key kvprime reads that this composition leaves out: "+" adds it
        return (f"{key}={value} is not accepted: this config does not set {key}, which kvprime reads; add it with "
                f"+{key}={value}. `kvprime run --cfg job` with your other overrides shows the config's keys.")
    close = difflib.get_close_matches(name, list(dict.fromkeys(accepted[section or None])), n=1, cutoff=0.6)
    guess = f" Did you mean {section + '.' if section else ''}{close[0]}?" if close and close[0] != name else ""
    plus = ("is refused too, unless the selected loader declares the option" if section == "dataset"
            else "is refused too")
    return (f"{key}={value} is not accepted: this config has no key {key}, and kvprime refuses every key it does not "
            f"read (so +{key}={value} {plus}).{guess} `kvprime run --cfg job` with your other overrides shows the "
            f"config's keys. {ADD_A_KEY}")


# Hydra's refusal of an override whose key the composed config lacks, with its hint to add it with "+".
_NO_SUCH_KEY = re.compile(r"Could not override '([^']+)'\.\s*To append to your config use \+[^=\s]+=(.*)")
# Hydra's opening when a config of the defaults list (not an override) could not be merged.
_IN_CONFIG = re.compile(r"In '([^']+)': ")


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _typed_value(key: str, value) -> str | None:
    """kvprime's paragraph for ``value``, which the schema's type of ``key`` refused (None: not a setting)."""
    if key in schema.SPECS:
        return schema.paragraph(key, value)
    if key in schema.sections():
        return schema.group_paragraph(key, value)
    return None


def user_error(err: BaseException, loader_options: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """kvprime's paragraph for Hydra's or OmegaConf's refusal ``err`` of a value or key (an override, or a config of
    conf/): a value of the wrong type for a setting (the setting's paragraph, as ``kvprime.config.settings.check``
    gives it), a key the composed config lacks (``not_in_config``; ``loader_options`` as there, None: kvprime's own
    dataset keys only), a key a declared section does not have (``unknown_key``). None for any other error, whose
    own message stands."""
    text = str(err).strip()
    missing = _NO_SUCH_KEY.search(text)
    if missing:
        value = (missing.group(2).splitlines() or [""])[0].strip()
        return not_in_config(missing.group(1), value, declared(), loader_options or {})
    where = _IN_CONFIG.match(text)
    origin = f" It was set in the config {where.group(1)!r}." if where else ""
    for cause in _causes(err):
        key = getattr(cause, "full_key", None)
        if not key:
            continue
        if isinstance(cause, ValidationError):
            mine = _typed_value(key, cause.value)
            return mine + origin if mine else None
        section, _, _ = key.rpartition(".")
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and section in schema.CLOSED_SECTIONS:
            source = f"the config {where.group(1)!r}" if where else None
            return unknown_key(key, None, declared()[section], source=source)
    return None
