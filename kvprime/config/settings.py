"""Checking a run config against the declared settings (``kvprime.config.schema``) before any model loads.

``check(cfg)`` validates a run config, composed by Hydra or a plain dict (a run's config.json, tests, the Python
API), and returns a copy with every missing setting filled with its declared default, so the code after it indexes
``cfg["stats"]["alpha"]`` instead of repeating ``.get(key, default)``. A bad value, or a key kvprime does not
read, raises ``ConfigError`` with one paragraph per problem: the dotted key, the value given and what is accepted.

Values are judged as they arrive (from Hydra's grammar and the schema's types, or from JSON): an int is a valid
float, a bool neither int nor float, a string accepted only where a word is (``auto``, ``skip``). Values are
never converted; only missing keys are filled.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from ..errors import ConfigError
from . import compose, confdir
from .devices import DEVICE_BATCH_DEFAULTS
from .schema import (
    CLEAN_MODES,
    DISTRACTOR_SOURCES,
    DTYPES,
    GOLD_SLOTS,
    METRICS,
    MIN_N_BOOT,
    ON_TOO_LONG,
    OPEN_UNIT,
    SINKS,
    SPECS,
    Answer,
    Batch,
    Dataset,
    Floor,
    Generation,
    Model,
    Multidoc,
    Rule,
    Run,
    Settings,
    Spec,
    Stats,
    default_words,
    group_paragraph,
    paragraph,
    show,
)

# The names other modules import from here (the schema's declarations, re-exported with the checks).
__all__ = ["CLEAN_MODES", "DISTRACTOR_SOURCES", "DTYPES", "GOLD_SLOTS", "METRICS", "MIN_N_BOOT", "ON_TOO_LONG",
           "OPEN_UNIT", "SINKS", "SPECS", "DEVICE_BATCH_DEFAULTS", "Answer", "Batch", "ConfigError", "Dataset", "Floor",
           "Generation", "Model", "Multidoc", "Rule", "Run", "Settings", "Spec", "Stats", "check", "check_value",
           "declared", "default", "defaults", "describe", "paragraph", "show"]

declared = compose.declared


def default(key: str):
    """The declared default of a dotted setting (``None`` for one that follows another, e.g. generation.seed)."""
    return copy.deepcopy(SPECS[key].default)


def check_value(key: str, value, *, error: type[ConfigError] = ConfigError):
    """``value`` if ``key`` accepts it, else ``error`` with the setting's paragraph (for callers outside a run,
    e.g. ``kvprime.data.load_samples``, ``kvprime.cache.batching.resolve``)."""
    if not SPECS[key].rule.ok(value):
        raise error(paragraph(key, value))
    return value


def _plain(cfg) -> dict:
    if type(cfg).__module__.startswith("omegaconf"):
        return confdir.resolved(cfg)
    return copy.deepcopy(dict(cfg))


def _holder(out: dict, spec: Spec, bad_top: set[str], problems: list[str]) -> dict | None:
    """The dict that holds ``spec``'s key in ``out`` (a section made if missing); None, said once, where the
    section is given a value instead of settings."""
    if spec.section is None:
        return out
    raw = out.get(spec.section)
    if raw is None:
        raw = out[spec.section] = {}
    if not isinstance(raw, Mapping):
        if spec.section not in bad_top:
            bad_top.add(spec.section)
            problems.append(group_paragraph(spec.section, raw))
        return None
    holder = out[spec.section] = dict(raw)
    return holder


def _check_shard(out: dict, problems: list[str]) -> None:
    shards = out.get("run")
    if not isinstance(shards, Mapping):
        return
    n, i = shards.get("num_shards"), shards.get("shard")
    if (SPECS["run.num_shards"].rule.ok(n) and SPECS["run.shard"].rule.ok(i) and isinstance(n, int)
            and isinstance(i, int) and i >= n):
        problems.append(f"run.shard={show(i)} is not a shard of run.num_shards={show(n)}: run.shard is this "
                        f"job's shard. Accepted: an integer from 0 to {n - 1} (default: 0).")


def check(cfg: Mapping, *, only: Iterable[str] | None = None, origin: str | None = None,
          condition_selected: bool | None = None, loader_options: Mapping[str, tuple] | None = None) -> dict:
    """Validate the run config ``cfg`` and return a copy with every missing setting filled with its default.

    ``only``: top-level names to check and fill (``("seed", "stats")`` for ``kvprime report``, which must not
    judge the model's device on another machine); default all. ``origin`` (e.g. a config.json path) is named
    in the error. ``condition_selected``: whether the run selected one condition (``condition=<name>``); False
    refuses ``condition.*`` keys, which only a selected condition reads (None: not judged). ``loader_options``: the
    registered dataset loaders' declared options (``kvprime.data.OPTIONS``), against which the dataset's keys are
    judged (None: not here; ``kvprime.data.load_samples`` judges them). Every bad value and every key kvprime does
    not read gets its own paragraph, in one ``ConfigError``."""
    out = _plain(cfg)
    wanted = None if only is None else set(only)
    problems: list[str] = []
    bad_top: set[str] = set()

    for spec in SPECS.values():
        if wanted is not None and (spec.section or spec.name) not in wanted:
            continue
        holder = _holder(out, spec, bad_top, problems)
        if holder is None:
            continue
        if spec.name not in holder:
            holder[spec.name] = out.get(spec.follows, spec.default) if spec.follows else copy.deepcopy(spec.default)
            continue
        value = holder[spec.name]
        if spec.follows and spec.follows in bad_top and value == out.get(spec.follows):
            continue  # seed=abc also arrives as dataset.seed and generation.seed (${seed}): said once
        if not spec.rule.ok(value):
            problems.append(paragraph(spec.key, value))
            if spec.section is None:
                bad_top.add(spec.key)

    problems += compose.unknown_in(out, declared(), show, wanted=wanted, condition_selected=condition_selected,
                                   loader_options=loader_options)
    if wanted is None or "run" in wanted:
        _check_shard(out, problems)
    compose.refuse(problems, origin)
    return out


def defaults() -> dict:
    """Every declared setting's default, nested as in the config (a following key holds its leader's default)."""
    return check({})


def describe() -> list[str]:
    """One line per setting: ``key = default  (accepted): what it is`` (for docs and --help)."""
    return [f"{spec.key} = {default_words(spec)}  ({spec.rule.words()}): {spec.what}" for spec in SPECS.values()]
