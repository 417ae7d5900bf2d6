"""The run's settings in one place: each setting's default, what it accepts and why, checked before any model loads.

The dataclasses below declare the run-level settings of ``conf/config.yaml`` (and the few model and dataset
keys every run relies on). ``check(cfg)`` validates a composed run config (a plain dict, as
``kvprime.pipeline.plan.plain`` gives) against them and returns a copy with every missing setting filled with its
default, so the code after it indexes ``cfg["stats"]["alpha"]`` instead of repeating ``.get(key, default)``.
A bad value raises ``ConfigError`` with one paragraph per bad setting: the dotted key, the value given and
what is accepted.

Values arrive typed by Hydra's grammar (``stats.alpha=2`` the int 2, ``seed=abc`` the string ``'abc'``): an int
is a valid float, a bool neither int nor float, a string accepted only where a word is (``auto``, ``skip``).
Values are never converted; only missing keys are filled. No torch import here (only to list CUDA devices).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import OmegaConf

from ..errors import ConfigError
from . import compose
from .devices import DEVICE_BATCH_DEFAULTS, device_ok, this_machine

# The accepted words of the settings that take one. generation.CLEAN_MODES and loading.DTYPES must be equal to
# these (tested); they are repeated here because kvprime.surrogates.generation and kvprime.models.loading import
# torch at module level.
CLEAN_MODES = ("first_content_line", "notebook")
DTYPES = ("float32", "bfloat16", "float16")
SINKS = ("bos", "none")
ON_TOO_LONG = ("skip", "error")
# What a run measures per sample and condition. nll is always scored (every statistic pairs on it); answer adds a
# greedy answer scored by SQuAD exact match, F1 and contains (kvprime.cache.answers, kvprime.analysis.answer_quality).
METRICS = ("nll", "answer")
DISTRACTOR_SOURCES, GOLD_SLOTS = ("random", "same_article", "nearest", "candidates"), ("first", "middle", "last", "random")

# Bootstrap resamples: at least 1000. A 95% interval's ends are the 2.5% and 97.5% quantiles; with 1000 resamples
# each tail holds 25, the fewest for which the ends (and BCa's corrections) stop moving visibly with the seed
# (Efron & Tibshirani 1993, ch. 14 and 19; the default 10000 gives 250 a tail). Fewer make the CI mostly
# resampling noise, and 0 makes scipy refuse, which used to leave NaN intervals in the tables without a word.
MIN_N_BOOT = 1000


@dataclass(frozen=True)
class Rule:
    """What a setting accepts: ``ok(value)``, and in words ``accepted`` (a string, or a function giving one).
    ``machine()`` adds what this machine offers to the error paragraph only (it may import torch);
    ``special(key, value)`` may give its own paragraph for a value."""

    accepted: str | Callable[[], str]
    ok: Callable[[Any], bool]
    special: Callable[[str, Any], str | None] | None = None
    machine: Callable[[], str] | None = None

    def words(self) -> str:
        return self.accepted() if callable(self.accepted) else self.accepted


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_at_least(lo: int, words: str | None = None) -> Rule:
    return Rule(words or f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo)


def _one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(" | ".join(choices), lambda v: isinstance(v, str) and v in choices)


BOOL = Rule("true | false", lambda v: isinstance(v, bool))
SEED = _int_at_least(0)  # numpy's generators refuse negative seeds (dataset selection, surrogates, routing)
OPEN_UNIT = Rule("a number strictly between 0 and 1", lambda v: _is_number(v) and 0 < v < 1)


def _batch_words(name: str) -> Callable[[], str]:
    def words() -> str:
        return "a positive integer, or auto: " + ", ".join(f"{d[name]} on {kind}"
                                                           for kind, d in DEVICE_BATCH_DEFAULTS.items())

    return words


def _positive_or_auto(name: str) -> Rule:
    return Rule(_batch_words(name), lambda v: v is None or v == "auto" or (_is_int(v) and v >= 1))


def _n_samples_zero(key: str, value) -> str | None:
    if _is_int(value) and value == 0:
        return f"{key}=0 selects no sample; give a positive integer, or null for all."
    return None


def setting(default, rule: Rule, what: str, *, follows: str | None = None):
    """A dataclass field declaring one setting. ``follows``: the top-level setting whose value a missing key
    takes (``generation.seed`` follows ``seed``), as the YAML's ``${seed}`` does."""
    return field(default=default, metadata={"rule": rule, "what": what, "follows": follows})


def section(cls):
    return field(default_factory=cls, metadata={"section": cls})


@dataclass(frozen=True)
class Stats:
    n_boot: int = setting(10000, _int_at_least(MIN_N_BOOT, f"an integer >= {MIN_N_BOOT} (fewer leave the CI's ends to "
                                                           "resampling noise)"),
                          "the number of bootstrap resamples for the CI of each mean delta")
    alpha: float = setting(0.05, OPEN_UNIT, "the significance level applied to Holm-adjusted p-values")
    confidence: float = setting(0.95, OPEN_UNIT, "the bootstrap confidence interval's level")
    # 0.02 nats is the exp21 notebook's own threshold for "no effect" (its diagnosis calls |delta| <= 0.02
    # "NO EFFECT"); a mean-NLL change of 0.02 nats moves the answer's probability by about 2%.
    equivalence_margin: float = setting(0.02, Rule("a number > 0 (nats of mean NLL)", lambda v: _is_number(v) and v > 0),
                                        "the equivalence margin of the TOST tests: a mean delta shown to lie within "
                                        "+-margin is 'equivalent'")
    tie_tolerance: float | str = setting("auto", Rule("a number >= 0 (nats), or auto: the model's measured numerical "
                                                      "floor, at least the dtype's documented value (float32 1e-4, "
                                                      "bfloat16/float16 1e-2)",
                                                      lambda v: v == "auto" or (_is_number(v) and v >= 0)),
                                         "the per-sample |delta| at or below which a pair counts as a tie")
    power: float = setting(0.8, OPEN_UNIT, "the power at which the minimum detectable effect is given")


@dataclass(frozen=True)
class Generation:
    temperature: float = setting(0.3, Rule("a number >= 0 (0 decodes greedily)", lambda v: _is_number(v) and v >= 0),
                                 "the sampling temperature of generated surrogates")
    max_new_tokens: int = setting(45, _int_at_least(1), "the most new tokens a generated surrogate may have")
    seed: int = setting(None, SEED, "the seed of generated surrogates", follows="seed")
    batch_size: int | str = setting("auto", _positive_or_auto("generation"),
                                    "the number of documents generated together")
    clean: str = setting("first_content_line", _one_of(CLEAN_MODES),
                         "how a generated text is cut down to one query")
    shared_prefix: bool = setting(True, BOOL, "encode the prompt's document-independent opening (chat template and "
                                  "instruction) once and continue every document's prefill from it; the "
                                  "surrogates do not depend on it")
    model: str | None = setting(None, Rule("null (the scored model), or the name of a model config in conf/model "
                                           "(e.g. qwen25_coder_05b_instruct)",
                                           lambda v: v is None or (isinstance(v, str) and bool(re.fullmatch(
                                               r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v)))),
                                "the model that writes generated surrogates")
    store: str | None = setting(None, Rule("a directory, or null for $KVPRIME_HOME/surrogates",
                                           lambda v: v is None or (isinstance(v, str) and v.strip() != "")),
                                "where generated surrogates are stored")


# floor.max_nll_diff=auto (kvprime.builders.floor.DEFAULT_MAX_NLL_DIFF): measured on SmolLM2-135M, the NLL
# difference between re-rotated and exact caches is 1.6e-6 in float32, 1.9e-2..2.8e-2 in bfloat16 and 5.1e-3 in
# float16; a re-rotation off by one position moves it 3e-2..5e-2, a skipped one (exp01's C1) ~1.2. So float32
# 1e-3 (500x its floor, 30x under an off-by-one), bfloat16 1e-1 (3.5-5x its floor, 12x under C1), float16 5e-2.
@dataclass(frozen=True)
class Floor:
    measure: bool | str = setting("auto", Rule("auto (when a condition re-rotates keys), true or false",
                                               lambda v: v == "auto" or isinstance(v, bool)),
                                  "whether the re-rotation's numerical floor is measured before scoring")
    max_nll_diff: float | str = setting("auto", Rule("a number > 0 (nats), or auto: float32 1e-3, bfloat16 1e-1, "
                                                     "float16 5e-2",
                                                     lambda v: v == "auto" or (_is_number(v) and v > 0)),
                                        "the largest NLL difference between re-rotated and exact caches a run accepts")


@dataclass(frozen=True)
class Batch:
    samples: int | str = setting("auto", _positive_or_auto("samples"),
                                 "the number of samples whose encodes are planned and run together")
    encode_tokens: int | str = setting("auto", _positive_or_auto("encode_tokens"),
                                       "the number of padded tokens per encode batch")
    score_tokens: int | str = setting("auto", _positive_or_auto("score_tokens"),
                                      "the number of cache tokens per scoring batch")
    # Continuing an encode from the cache of another that its ids and positions begin with changes no number
    # beyond float rounding (tests/test_prefix_extension.py); false encodes each from scratch (the bench's
    # side-by-side, debugging).
    extend_prefixes: bool = setting(False, BOOL, "whether an encode continues from the cache of a planned encode "
                                                "(or shared opening) its ids and positions begin with")


def _metrics_ok(v) -> bool:
    return (isinstance(v, (list, tuple)) and all(isinstance(m, str) and m in METRICS for m in v)
            and len(set(v)) == len(v) and "nll" in v)


@dataclass(frozen=True)
class Answer:
    # SQuAD answers are a few words (a median of 2-3); 32 tokens leaves room for a sentence while bounding what a
    # model that never writes a newline costs per condition.
    max_new_tokens: int = setting(32, _int_at_least(1), "the most tokens decoded for an answer (metrics: answer); "
                                                        "decoding stops earlier at a newline or an end token")


@dataclass(frozen=True)
class Run:
    num_shards: int = setting(1, _int_at_least(1), "the number of jobs a run's samples are dealt to")
    shard: int = setting(0, _int_at_least(0, "an integer from 0 to run.num_shards-1"), "this job's shard")


@dataclass(frozen=True)
class Dataset:
    n_samples: int | None = setting(None, Rule("a positive integer, or null for all",
                                               lambda v: v is None or (_is_int(v) and v >= 1), _n_samples_zero),
                                    "the number of samples the run selects")
    seed: int | None = setting(None, Rule("an integer >= 0, or null", lambda v: v is None or SEED.ok(v)),
                               "the seed of dataset.selection=random", follows="seed")
    group_by_passage: bool = setting(False, BOOL, "whether whole passages of >= 2 questions are selected, scored "
                                                  "and sharded together, each passage's caches built once for all "
                                                  "its questions (n_samples counts questions; kvprime.data.passages)")


@dataclass(frozen=True)
class Multidoc:
    k: int = setting(1, _int_at_least(1), "the number of passages per sample: the gold one and k-1 distractors")
    distractors: str = setting("random", _one_of(DISTRACTOR_SOURCES), "where the distractor passages come from")
    gold_slot: str = setting("random", _one_of(GOLD_SLOTS), "where the gold passage sits (drawn from dataset.seed)")


@dataclass(frozen=True)
class Model:
    device: str = setting("auto", Rule("auto (cuda if present, else cpu), cpu, cuda or cuda:N", device_ok,
                                       machine=this_machine), "the device the model runs on")
    dtype: str = setting("float32", _one_of(DTYPES), "the model's weight and compute dtype")
    sink: str = setting("bos", _one_of(SINKS), "the first cache entry (bos: the BOS token; none: no sink)")


@dataclass(frozen=True)
class Settings:
    """The run-level settings (conf/config.yaml) and the model and dataset keys checked with them."""

    seed: int = setting(42, SEED, "the run's seed (random controls, bootstrap; dataset.seed and generation.seed "
                                  "follow it)")
    resume: bool = setting(False, BOOL, "whether a killed run is continued in the same directory")
    save_tokens: bool = setting(False, BOOL, "whether scores.jsonl stores every cache's token and position ids")
    per_token: bool = setting(False, BOOL, "whether scores.jsonl stores per-token answer log-probabilities")
    on_too_long: str = setting("skip", _one_of(ON_TOO_LONG),
                               "what happens to a sample longer than the model's context (skip: skipped and counted)")
    progress: bool = setting(True, BOOL, "whether progress bars are shown")
    metrics: list = setting(("nll",), Rule(f"a list of distinct metrics out of {', '.join(METRICS)} that includes nll "
                                           "(e.g. [nll] or [nll,answer])", _metrics_ok),
                            "what is measured per sample and condition (answer: a greedily decoded answer, scored "
                            "by exact match, contains and F1)")
    plugins: list = setting((), Rule("a list of module names or .py file paths",
                                     lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) and x.strip()
                                                                                   for x in v)),
                            "modules imported before the run, which register builders, surrogate sources or "
                            "analyses (kvprime.plugins)")
    stats: Stats = section(Stats)
    generation: Generation = section(Generation)
    answer: Answer = section(Answer)
    floor: Floor = section(Floor)
    batch: Batch = section(Batch)
    run: Run = section(Run)
    dataset: Dataset = section(Dataset)
    model: Model = section(Model)
    multidoc: Multidoc = section(Multidoc)


# Sections whose every key is declared here: another key in them is a misspelling (Hydra only lets one in
# with +key=...). model, dataset and experiment carry more keys than they declare rules for (kvprime.config.compose).
CLOSED_SECTIONS = ("stats", "generation", "floor", "batch", "run", "multidoc", "answer")


@dataclass(frozen=True)
class Spec:
    key: str            # dotted: "stats.alpha"
    section: str | None
    name: str
    default: Any
    rule: Rule
    what: str
    follows: str | None


def _specs() -> dict[str, Spec]:
    out: dict[str, Spec] = {}

    def add(cls, sec):
        for f in fields(cls):
            if "section" in f.metadata:
                add(f.metadata["section"], f.name)
                continue
            key = f"{sec}.{f.name}" if sec else f.name
            out[key] = Spec(key, sec, f.name, f.default, f.metadata["rule"], f.metadata["what"],
                            f.metadata["follows"])

    add(Settings, None)
    return out


SPECS: dict[str, Spec] = _specs()


def show(value, quote: bool = True) -> str:
    """A value in the config's own spelling: null, true/false, numbers, strings quoted (``quote``) so that a
    number given as a string ('2') is told apart from the number."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not quote:
        return value
    return repr(value)


def _default_words(spec: Spec) -> str:
    if spec.follows:
        return f"the value of {spec.follows}"
    return show(spec.default, quote=False)


def paragraph(key: str, value) -> str:
    """The paragraph for a value ``key`` does not accept."""
    spec = SPECS[key]
    special = spec.rule.special(key, value) if spec.rule.special else None
    if special:
        return special
    machine = f"; {spec.rule.machine()}" if spec.rule.machine else ""
    return (f"{key}={show(value)} is not accepted: {key} is {spec.what}. Accepted: {spec.rule.words()}{machine} "
            f"(default: {_default_words(spec)}).")


def default(key: str):
    """The declared default of a dotted setting (``None`` for one that follows another, e.g. generation.seed)."""
    return SPECS[key].default


def check_value(key: str, value, *, error: type[ConfigError] = ConfigError):
    """``value`` if ``key`` accepts it, else ``error`` with the setting's paragraph (for callers outside a run,
    e.g. ``kvprime.data.load_samples``, ``kvprime.cache.batching.resolve``)."""
    if not SPECS[key].rule.ok(value):
        raise error(paragraph(key, value))
    return value


def _plain(cfg) -> dict:
    if type(cfg).__module__.startswith("omegaconf"):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(dict(cfg))


def declared() -> dict[str | None, tuple[str, ...]]:
    """The keys of the top level (None) and of every section whose keys are all declared here."""
    top = tuple(dict.fromkeys(k.split(".", 1)[0] for k in SPECS)) + tuple(g for g in compose.GROUPS if g not in SPECS)
    return {None: top, **{s: tuple(k.split(".")[1] for k in SPECS if k.startswith(s + ".")) for s in CLOSED_SECTIONS}}


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
        top = spec.section or spec.name
        if wanted is not None and top not in wanted:
            continue
        if spec.section is None:
            holder = out
        else:
            raw = out.get(spec.section)
            if raw is None:
                raw = out[spec.section] = {}
            if not isinstance(raw, Mapping):
                if spec.section not in bad_top:
                    bad_top.add(spec.section)
                    problems.append(f"{spec.section}={show(raw)} is not accepted: {spec.section} is a group of "
                                    f"settings ({', '.join(k for k in SPECS if k.startswith(spec.section + '.'))}), "
                                    "not a value; set one of them, e.g. "
                                    f"{next(k for k in SPECS if k.startswith(spec.section + '.'))}=...")
                continue
            holder = out[spec.section] = dict(raw)
        if spec.name not in holder:
            holder[spec.name] = out.get(spec.follows, spec.default) if spec.follows else spec.default
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

    shards = out.get("run")
    if (wanted is None or "run" in wanted) and isinstance(shards, Mapping):
        n, i = shards.get("num_shards"), shards.get("shard")
        if SPECS["run.num_shards"].rule.ok(n) and SPECS["run.shard"].rule.ok(i) and i >= n:
            problems.append(f"run.shard={show(i)} is not a shard of run.num_shards={show(n)}: run.shard is this "
                            f"job's shard. Accepted: an integer from 0 to {n - 1} (default: 0).")

    compose.refuse(problems, origin)
    return out


def defaults() -> dict:
    """Every declared setting's default, nested as in the config (a following key holds its leader's default)."""
    return check({})


def describe() -> list[str]:
    """One line per setting: ``key = default  (accepted): what it is`` (for docs and --help)."""
    lines = []
    for spec in SPECS.values():
        lines.append(f"{spec.key} = {_default_words(spec)}  ({spec.rule.words()}): {spec.what}")
    return lines

