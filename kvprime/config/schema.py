"""Every run setting declared once: its type, default, accepted values and the sentence kvprime says about it, as
dataclasses that Hydra composes every run config on (the structured config ``kvprime_schema``, first in
``conf/config.yaml``'s defaults list), so conf/config.yaml repeats none of them.

A field's type is OmegaConf's to enforce while Hydra composes (``stats.alpha=abc`` is refused before kvprime sees
the config; ``kvprime.config.compose.user_error`` answers with the paragraph below). Two kinds of setting are typed
Any, their type left to the rule: one that takes a number or a word (``auto``), since OmegaConf 2.3 has no Union,
and a real number that an integer also spells (``generation.temperature=0``), since a float node would convert it
and the run's config.json would record 0.0 where it records 0. A field's metadata holds kvprime's ``Rule`` (what it
accepts, in code and in words) and what the setting is; ``kvprime.config.settings.check`` applies the rules to the
composed config, and to plain dicts (a run's config.json, the Python API), before any model loads.

model and dataset are config groups whose keys depend on the option chosen (a model's source, a dataset's loader):
the schema gives them an open dict that the option's YAML fills (a typed node would refuse an option's own keys),
and ``Model`` and ``Dataset`` declare the rules and defaults of the keys every option shares (``group``).
No torch is imported here (only to list CUDA devices, in ``kvprime.config.devices``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .devices import DEVICE_BATCH_DEFAULTS, device_ok, this_machine

# The name conf/config.yaml's defaults list gives the schema.
SCHEMA_NAME = "kvprime_schema"

# The accepted words of the settings that take one, here because this is the lowest layer that needs them
# (kvprime.surrogates.generation and kvprime.models.loading import them from here).
CLEAN_MODES = ("first_content_line", "notebook")
DTYPES = ("float32", "bfloat16", "float16")
SINKS = ("bos", "none")
ON_TOO_LONG = ("skip", "error")
# What a run measures per sample and condition. nll is always scored (every statistic pairs on it); answer adds a
# greedy answer scored by SQuAD exact match, F1 and contains (kvprime.cache.answers, kvprime.analysis.answer_quality).
METRICS = ("nll", "answer")
DISTRACTOR_SOURCES = ("random", "same_article", "nearest", "candidates")
GOLD_SLOTS = ("first", "middle", "last", "random")
# Where a finished run is logged besides its directory: none, or an experiment tracker (kvprime.tracking holds one
# module per tracker, conf/tracking one option per name).
TRACKERS = ("none", "mlflow")

# Bootstrap resamples: at least 1000. A 95% interval's ends are the 2.5% and 97.5% quantiles; with 1000 resamples
# each tail holds 25, the fewest for which the ends (and BCa's corrections) stop moving visibly with the seed
# (Efron & Tibshirani 1993, ch. 14 and 19; the default 10000 gives 250 a tail). Fewer make the CI mostly
# resampling noise, and 0 makes scipy refuse, which would leave NaN intervals in the tables.
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


def _metrics_ok(v) -> bool:
    return (isinstance(v, (list, tuple)) and all(isinstance(m, str) and m in METRICS for m in v)
            and len(set(v)) == len(v) and "nll" in v)


def _plugins_ok(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) and x.strip() for x in v)


def setting(default, rule: Rule, what: str, *, follows: str | None = None):
    """A dataclass field declaring one setting. ``follows``: the top-level setting whose value the key takes unless
    set (``generation.seed`` follows ``seed``): in the schema an interpolation, ``${seed}``."""
    meta = {"rule": rule, "what": what, "follows": follows}
    if follows:
        return field(default="${" + follows + "}", metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls):
    """A section of settings whose every key ``cls`` declares: a typed node, which refuses any other key."""
    return field(default_factory=cls, metadata={"section": cls})


def group(cls):
    """A config group's node (model, dataset): an open dict that the selected option's YAML fills. ``cls`` declares
    the rules and defaults of the keys every option shares; ``kvprime.config.settings.check`` fills a key an option
    lacks. The node holds no defaults itself: merged before the option's YAML they would come first in its keys,
    and a run's config.json (compared by resume and merge, byte for byte by people) keeps the YAML's order."""
    return field(default_factory=dict, metadata={"section": cls, "group": True})


@dataclass
class Stats:
    n_boot: int = setting(10000, _int_at_least(MIN_N_BOOT, f"an integer >= {MIN_N_BOOT} (fewer leave the CI's ends to "
                                                           "resampling noise)"),
                          "the number of bootstrap resamples for the CI of each mean delta")
    alpha: float = setting(0.05, OPEN_UNIT, "the significance level applied to Holm-adjusted p-values")
    confidence: float = setting(0.95, OPEN_UNIT, "the bootstrap confidence interval's level")
    # 0.02 nats is the exp21 notebook's own threshold for "no effect" (its diagnosis calls |delta| <= 0.02
    # "NO EFFECT"); a mean-NLL change of 0.02 nats moves the answer's probability by about 2%.
    equivalence_margin: Any = setting(0.02, Rule("a number > 0 (nats of mean NLL)", lambda v: _is_number(v) and v > 0),
                                      "the equivalence margin of the TOST tests: a mean delta shown to lie within "
                                      "+-margin is 'equivalent'")
    tie_tolerance: Any = setting("auto", Rule("a number >= 0 (nats), or auto: the model's measured numerical "
                                              "floor, at least the dtype's documented value (float32 1e-4, "
                                              "bfloat16/float16 1e-2)",
                                              lambda v: v == "auto" or (_is_number(v) and v >= 0)),
                                 "the per-sample |delta| at or below which a pair counts as a tie")
    power: float = setting(0.8, OPEN_UNIT, "the power at which the minimum detectable effect is given")


@dataclass
class Generation:
    temperature: Any = setting(0.3, Rule("a number >= 0 (0 decodes greedily)", lambda v: _is_number(v) and v >= 0),
                               "the sampling temperature of generated surrogates")
    max_new_tokens: int = setting(45, _int_at_least(1), "the most new tokens a generated surrogate may have")
    seed: int = setting(None, SEED, "the seed of generated surrogates", follows="seed")
    batch_size: Any = setting("auto", _positive_or_auto("generation"),
                              "the number of documents generated together")
    # first_content_line skips label lines like "The question should be:" (small models open with one);
    # notebook keeps the first line, as the walkthrough did.
    clean: str = setting("first_content_line", _one_of(CLEAN_MODES), "how a generated text is cut down to one query")
    shared_prefix: bool = setting(True, BOOL, "encode the prompt's document-independent opening (chat template and "
                                  "instruction) once and continue every document's prefill from it; the "
                                  "surrogates do not depend on it")
    # store, model and plugins name a directory, a model config and modules: typed Any (a list of Any), since a string
    # node would turn store=true or model=3 into the name 'True' or '3' (their rules refuse what is not a string).
    store: Any = setting(None, Rule("a directory, or null for $KVPRIME_HOME/surrogates",
                                    lambda v: v is None or (isinstance(v, str) and v.strip() != "")),
                         "where generated surrogates are stored")
    model: Any = setting(None, Rule("null (the scored model), or the name of a model config in conf/model "
                                    "(e.g. qwen25_coder_05b_instruct)",
                                    lambda v: v is None or (isinstance(v, str) and bool(re.fullmatch(
                                        r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v)))),
                         "the model that writes generated surrogates")


@dataclass
class Answer:
    # SQuAD answers are a few words (a median of 2-3); 32 tokens leaves room for a sentence while bounding what a
    # model that never writes a newline costs per condition.
    max_new_tokens: int = setting(32, _int_at_least(1), "the most tokens decoded for an answer (metrics: answer); "
                                                        "decoding stops earlier at a newline or an end token")


# floor.max_nll_diff=auto (kvprime.builders.floor.DEFAULT_MAX_NLL_DIFF): float32 1e-3, bfloat16 1e-1, float16 5e-2,
# each well above the dtype's re-rotation floor and well under what a re-rotation off by one position costs
# (docs/concepts.md: the numerical floor).
@dataclass
class Floor:
    measure: Any = setting("auto", Rule("auto (when a condition re-rotates keys), true or false",
                                        lambda v: v == "auto" or isinstance(v, bool)),
                           "whether the re-rotation's numerical floor is measured before scoring")
    max_nll_diff: Any = setting("auto", Rule("a number > 0 (nats), or auto: float32 1e-3, bfloat16 1e-1, "
                                             "float16 5e-2",
                                             lambda v: v == "auto" or (_is_number(v) and v > 0)),
                                "the largest NLL difference between re-rotated and exact caches a run accepts")


@dataclass
class Batch:
    samples: Any = setting("auto", _positive_or_auto("samples"),
                           "the number of samples whose encodes are planned and run together")
    encode_tokens: Any = setting("auto", _positive_or_auto("encode_tokens"),
                                 "the number of padded tokens per encode batch")
    score_tokens: Any = setting("auto", _positive_or_auto("score_tokens"),
                                "the number of cache tokens per scoring batch")
    # Continuing an encode from the cache of another that its ids and positions begin with changes no number
    # beyond float rounding (tests/test_prefix_extension.py); false encodes each from scratch (docs/performance.md).
    extend_prefixes: bool = setting(False, BOOL, "whether an encode continues from the cache of a planned encode "
                                                "(or shared opening) its ids and positions begin with")


@dataclass
class Run:
    num_shards: int = setting(1, _int_at_least(1), "the number of jobs a run's samples are dealt to")
    # A job's samples: chunks of batch.samples consecutive samples dealt round-robin (kvprime merge joins them).
    shard: int = setting(0, _int_at_least(0, "an integer from 0 to run.num_shards-1"), "this job's shard")


@dataclass
class Multidoc:
    k: int = setting(1, _int_at_least(1), "the number of passages per sample: the gold one and k-1 distractors")
    distractors: str = setting("random", _one_of(DISTRACTOR_SOURCES), "where the distractor passages come from")
    gold_slot: str = setting("random", _one_of(GOLD_SLOTS), "where the gold passage sits (drawn from dataset.seed)")


def _text_or_null(words: str, null: str) -> Rule:
    return Rule(f"{words}, or null ({null})", lambda v: v is None or (isinstance(v, str) and v.strip() != ""))


# tracking_uri and experiment_name are typed Any as generation.store is: a string node would turn a number into a name.
@dataclass
class Tracking:
    backend: str = setting("none", _one_of(TRACKERS), "the experiment tracker a finished run is logged to "
                                                       "(kvprime.tracking; none: the run directory only)")
    tracking_uri: Any = setting(None, _text_or_null("a tracking URI (sqlite:///<file>, http://<host>:<port>, ...)",
                                                    "sqlite:///<output root>/mlflow.db"),
                                "where the tracker stores its runs")
    experiment_name: Any = setting(None, _text_or_null("a name", "the run's experiment.name"),
                                   "the tracker's experiment the run is logged under")


@dataclass
class Model:
    """The keys every model config shares (the rest depend on its source: kvprime.config.compose.MODEL_KEYS)."""

    device: str = setting("auto", Rule("auto (cuda if present, else cpu), cpu, cuda or cuda:N", device_ok,
                                       machine=this_machine), "the device the model runs on")
    dtype: str = setting("float32", _one_of(DTYPES), "the model's weight and compute dtype")
    sink: str = setting("bos", _one_of(SINKS), "the first cache entry (bos: the BOS token; none: no sink)")


@dataclass
class Dataset:
    """The keys every dataset config shares that kvprime checks (a loader adds its own: kvprime.data)."""

    n_samples: int | None = setting(None, Rule("a positive integer, or null for all",
                                               lambda v: v is None or (_is_int(v) and v >= 1), _n_samples_zero),
                                    "the number of samples the run selects")
    seed: int | None = setting(None, Rule("an integer >= 0, or null", lambda v: v is None or SEED.ok(v)),
                               "the seed of dataset.selection=random", follows="seed")
    group_by_passage: bool = setting(False, BOOL, "whether whole passages of >= 2 questions are selected, scored "
                                                  "and sharded together, each passage's caches built once for all "
                                                  "its questions (n_samples counts questions; kvprime.data.passages)")


@dataclass
class Settings:
    """A run config: the run-level settings, their sections, and the model and dataset groups. The experiment, its
    conditions and a selected condition come from their groups alone."""

    seed: int = setting(42, SEED, "the run's seed (random controls, bootstrap; dataset.seed and generation.seed "
                                  "follow it)")
    resume: bool = setting(False, BOOL, "whether a killed run is continued in the same directory")
    save_tokens: bool = setting(False, BOOL, "whether scores.jsonl stores every cache's token and position ids")
    per_token: bool = setting(False, BOOL, "whether scores.jsonl stores per-token answer log-probabilities")
    on_too_long: str = setting("skip", _one_of(ON_TOO_LONG),
                               "what happens to a sample longer than the model's context (skip: skipped and counted)")
    progress: bool = setting(True, BOOL, "whether progress bars are shown")
    metrics: list[str] = setting(["nll"], Rule(f"a list of distinct metrics out of {', '.join(METRICS)} that "
                                               "includes nll (e.g. [nll] or [nll,answer])", _metrics_ok),
                                 "what is measured per sample and condition (answer: a greedily decoded answer, "
                                 "scored by exact match, contains and F1)")
    plugins: list[Any] = setting([], Rule("a list of module names or .py file paths", _plugins_ok),
                                 "modules imported before the run, which register builders, surrogate sources or "
                                 "analyses (kvprime.plugins)")
    batch: Batch = section(Batch)
    run: Run = section(Run)
    multidoc: Multidoc = section(Multidoc)
    generation: Generation = section(Generation)
    answer: Answer = section(Answer)
    floor: Floor = section(Floor)
    stats: Stats = section(Stats)
    tracking: Tracking = section(Tracking)
    model: dict[str, Any] = group(Model)
    dataset: dict[str, Any] = group(Dataset)


@dataclass(frozen=True)
class Spec:
    key: str            # dotted: "stats.alpha"
    section: str | None
    name: str
    default: Any        # None for a key that follows another
    rule: Rule
    what: str
    follows: str | None


def _default(f) -> Any:
    if f.metadata["follows"]:
        return None
    return f.default_factory() if f.default is MISSING else f.default


def _specs() -> dict[str, Spec]:
    out: dict[str, Spec] = {}
    for f in fields(Settings):
        if "section" not in f.metadata:
            out[f.name] = Spec(f.name, None, f.name, _default(f), f.metadata["rule"], f.metadata["what"],
                               f.metadata["follows"])
            continue
        for g in fields(f.metadata["section"]):
            key = f"{f.name}.{g.name}"
            out[key] = Spec(key, f.name, g.name, _default(g), g.metadata["rule"], g.metadata["what"],
                            g.metadata["follows"])
    return out


SPECS: dict[str, Spec] = _specs()
# Sections whose every key is declared here: another key in them is a misspelling. model and dataset carry more
# keys than they declare rules for (kvprime.config.compose).
CLOSED_SECTIONS = tuple(f.name for f in fields(Settings) if "section" in f.metadata and not f.metadata.get("group"))


def register() -> None:
    """Store the schema in Hydra's ConfigStore under ``SCHEMA_NAME``, before Hydra composes conf/."""
    node = OmegaConf.structured(Settings)
    # The top level stays open while Hydra composes: condition=<name> adds a key the schema cannot declare (with no
    # condition selected the key must be absent, as in every run's config.json, which resume compares). Hydra
    # closes the composed config; kvprime.config.settings.check refuses a top-level key kvprime does not read.
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=node)


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


def default_words(spec: Spec) -> str:
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
            f"(default: {default_words(spec)}).")


def group_paragraph(section_name: str, value) -> str:
    """The paragraph for a value given to a whole section (``stats=0.05``)."""
    keys = [k for k in SPECS if k.startswith(section_name + ".")]
    return (f"{section_name}={show(value)} is not accepted: {section_name} is a group of settings ({', '.join(keys)}), "
            f"not a value; set one of them, e.g. {keys[0]}=...")


def sections() -> tuple[str, ...]:
    """The names of the sections (and groups) the schema declares keys of."""
    return tuple(dict.fromkeys(s.section for s in SPECS.values() if s.section))
