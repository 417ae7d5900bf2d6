"""What a run is, before any model loads: its checked settings, its conditions (the experiment's, or one and
the baseline), its named comparisons, the selection and this job's samples, the random-query pool, the surrogate
sources' prepared state, and every check that needs no weights. ``prepare`` returns it as a ``RunPlan``, which
every later stage reads by attribute and which writes the run's plan.json.

The commands that must not import torch use what this module builds on, not this module: the named comparisons
(``kvprime.config.comparisons``) and the chunks and shards of the selection (``kvprime.pipeline.sharding``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from omegaconf import DictConfig, OmegaConf

from ..analysis.registry import validate_analyses
from ..analysis.routing import validate as validate_routing
from ..builders import BUILDERS
from ..builders.conditions import ConditionSpec, builder_notes, validate
from ..cache import batching
from ..cache import hf_internals as hf
from ..config import confdir, plugins, settings
from ..config.comparisons import comparisons_for
from ..data import OPTIONS, LoadResult, load_samples
from ..data.passages import groups
from ..errors import RunError
from ..files import rundir
from ..files.results_io import write_json
from ..models import loading
from ..surrogates import sources
from ..surrogates.generator import generator_model_cfg
from ..surrogates.store import SurrogateStore
from .sharding import chunk_size, grouped, shard


@dataclass(frozen=True)
class RunPlan:
    """One run's plan, made before any model loads (``prepare``), read by every later stage by attribute."""

    cfg: dict  # the checked settings (batch sizes resolved to numbers)
    conditions: Mapping[str, ConditionSpec]  # name -> spec, in run order
    comparisons: tuple[dict, ...]  # the experiment's named comparisons among this run's conditions and routes
    selection: LoadResult  # every selected sample (the whole selection, not the shard) and the rejections
    samples: tuple  # this job's samples (its shard of the selection)
    pool: tuple[str, ...]  # the random-query pool: the whole selection's queries, not the shard's
    model: Mapping  # the scored model's settings (cfg["model"])
    generator_model: Mapping  # the settings of the model that writes generated surrogates
    plugins: Mapping[str, str | None]  # each loaded plugin -> the file it came from
    only: str | None  # condition=<name>: that condition and the baseline
    grouped: bool  # dataset.group_by_passage: questions grouped by passage
    surrogate_sources: sources.PreparedSources  # each source's state and the donors, over the whole selection
    load_data_s: float = 0.0  # seconds spent loading and selecting the data

    @property
    def seed(self) -> int:
        return int(self.cfg["seed"])

    def record(self) -> dict:
        """plan.json's content: what ``kvprime report`` and ``kvprime merge`` read without the run's code (the
        conditions as their YAML, the builders' notes, the plugins' files). Its keys and their order are the run
        directory's format: shards' plan.json files are compared byte for byte."""
        return {"only": self.only, "conditions": {n: s.to_dict() for n, s in self.conditions.items()},
                "builder_notes": builder_notes(self.conditions), "plugins": dict(self.plugins)}

    def write(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / "plan.json", self.record())


def plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return confdir.resolved(cfg)
    return json.loads(json.dumps(cfg))


def plan_conditions(cfg: Mapping, only: str | None = None) -> dict[str, ConditionSpec]:
    """The run's conditions in order. ``only`` (``condition=<name>``) keeps that one and the baseline.

    ``experiment.cache_variant: truncated`` turns every full cache with a prefix surrogate into its
    truncated-and-corrected twin (the routing experiment's setting)."""
    exp = cfg["experiment"]
    defined = dict(cfg.get("conditions") or {})
    baseline = exp["baseline"]
    if only is not None:
        raw, only = only, only.rsplit("/", 1)[-1]  # condition=exp01/C2_... names the condition C2_...
        chosen = dict(cfg.get("condition") or {})
        # Two sources can define it: the selected file (overridable as condition.*) and the experiment
        # (overridable as conditions.<name>.*). Whichever the user changed from the file wins; both: an error.
        try:
            original = OmegaConf.to_container(confdir.load("condition", raw), resolve=True)
        except ValueError:
            original = None
        chosen_changed = bool(chosen) and chosen != original
        defined_changed = defined.get(only) is not None and dict(defined[only]) != original
        if chosen_changed and defined_changed:
            raise RunError(f"condition={raw} was overridden both as condition.* and as conditions.{only}.*; "
                           "use one of the two.")
        names = [baseline] if only == baseline else [baseline, only]
        defined = {**{baseline: defined.get(baseline)},
                   only: chosen if chosen_changed or defined.get(only) is None else defined[only]}
    else:
        names = list(defined)
    if baseline not in defined or defined[baseline] is None:
        raise RunError(f"experiment {exp['name']!r} names baseline {baseline!r}, which is not among its conditions "
                       f"({', '.join(n for n in defined if defined[n] is not None)}).")
    variant = exp.get("cache_variant") or "as_defined"
    if variant not in ("as_defined", "full", "truncated"):
        raise RunError(f"experiment.cache_variant={variant!r} is not known. Accepted: as_defined, full, truncated.")
    specs = {}
    for name in names:
        fields = dict(defined[name])
        if variant == "truncated" and fields.get("builder", "full") == "full" and fields.get("prefix_template") \
                and fields.get("surrogate", "none") != "none":
            fields.update(builder="truncate_prefix", rope_fix="rerotate")
        spec = ConditionSpec.from_config(name, fields)
        validate(spec, BUILDERS, check_source=_check_source)
        specs[name] = spec
    return specs


def _check_source(surrogate: str) -> None:
    """A condition's surrogate source must be registered and its argument known (``validate``'s source check)."""
    sources.validate_source(surrogate, sources.STATIC_SURROGATES)


def prepare(cfg, only: str | None = None, *, condition_selected: bool | None = None,
            plugin_dirs: Sequence = ()) -> RunPlan:
    """Every check that needs no model and writes nothing: settings, conditions, routing, comparisons, RoPE
    support, and the data (loaded and selected here, so a data problem is reported before any write), and the
    surrogate sources' state over the selection (a source the selection cannot serve is refused here).
    ``condition_selected``: whether the command line selected one condition (``condition=<name>``; False refuses
    ``condition.*`` keys, which nothing would read; None: not judged). ``plugin_dirs``: where the run's plugins are
    looked for besides the current directory (its config folders)."""
    checked = settings.check(plain(cfg), condition_selected=condition_selected, loader_options=OPTIONS)
    cfg = batching.resolve(checked)
    loaded_plugins = plugins.load_modules(cfg["plugins"], dirs=plugin_dirs)  # first: conditions may name theirs
    exp = cfg["experiment"]
    if "per_passage" in validate_analyses(exp.get("analyses")) and not grouped(cfg):
        raise RunError("experiment.analyses names per_passage, which needs the passage of every question, but "
                       "dataset.group_by_passage=false. Accepted: dataset.group_by_passage=true, or drop per_passage.")
    specs = plan_conditions(cfg, only)
    comparisons = _comparisons(cfg, specs, only)
    _check_store(cfg, specs)
    generator = generator_model_cfg(cfg)  # generation.model names a usable conf/model config (nothing loaded)
    _check_rope(cfg, specs)
    t = time.perf_counter()
    loaded = load_samples({**cfg["dataset"]}, multidoc=cfg["multidoc"])
    samples = shard(loaded.samples, cfg.get("run") or {}, chunk_size(cfg), grouped=grouped(cfg))
    if not samples:
        raise RunError(f"dataset {cfg['dataset']['name']!r} gave no usable samples "
                       f"({len(loaded.rejected)} rejected; e.g. {loaded.rejected[:3]}).")
    # A donor, a sibling: said before the model loads, and computed once for every later stage.
    prepared = sources.prepare_all((s.surrogate for s in specs.values()), loaded.samples, cfg["seed"])
    _check_random_pool(cfg, specs, loaded.samples)
    return RunPlan(cfg=cfg, conditions=MappingProxyType(specs), comparisons=tuple(comparisons), selection=loaded,
                   samples=tuple(samples), pool=tuple(s.query for s in loaded.samples), model=cfg["model"],
                   generator_model=generator, plugins=MappingProxyType(plugins.origins(loaded_plugins)), only=only,
                   grouped=grouped(cfg), surrogate_sources=prepared, load_data_s=time.perf_counter() - t)


def _comparisons(cfg: Mapping, specs: Mapping, only: str | None) -> list[dict]:
    """The routing rules checked (a whole run only) and the named comparisons among the run's conditions."""
    exp = cfg["experiment"]
    derived = [dict(r) for r in exp.get("derived") or []]
    if only is None:
        validate_routing(derived, list(specs))
        if any(r["pick"] == "max_similarity" for r in derived) and not exp.get("similarity"):
            raise RunError(f"experiment {exp['name']!r} routes by similarity (pick: max_similarity) but computes none; "
                           "set experiment.similarity=true.")
    names = list(specs) + [r["name"] for r in derived]
    return comparisons_for(exp, {**(cfg.get("conditions") or {}), **{r["name"]: r for r in derived}}, names)


def _check_rope(cfg: Mapping, specs: Mapping) -> None:
    """Each builder declares the RoPE correction its settings need; the model's config must support it."""
    mconf = loading.model_config(cfg["model"])
    for spec in specs.values():
        info = BUILDERS[spec.builder]
        needed = info.rope_fix(info.make_params(spec.builder_params, f"condition {spec.name!r}"))
        if needed is not None:
            hf.check_config_supports(mconf, needed)


def _check_random_pool(cfg: Mapping, specs: Mapping, selection: list) -> None:
    """``random_query`` draws each sample's control from the whole selection's other queries (grouped by passage:
    other passages' questions). A selection that leaves a sample none is refused here, not when it is scored."""
    names = [n for n, s in specs.items() if s.surrogate == "random_query"]
    unserved = sources.random_query_unserved(selection, by_passage=grouped(cfg)) if names else []
    if not unserved:
        return
    conditions = f"condition{'s' if len(names) > 1 else ''} {', '.join(names)}"
    drop = f"or drop the random_query condition{'s' if len(names) > 1 else ''}"
    n = cfg["dataset"].get("n_samples")
    if not grouped(cfg):
        raise RunError(f"surrogate source random_query ({conditions}) draws each sample's random control from the "
                       f"other selected samples' queries, but the {len(selection)} selected sample(s) (e.g. "
                       f"{unserved[0].sample_id!r}) have no other query (dataset.n_samples={n}). Raise "
                       f"dataset.n_samples, {drop}.")
    passages = groups(selection)
    if len(passages) > 1:  # several passages, whose questions are all worded alike: no larger n is sure to help
        raise RunError(f"surrogate source random_query ({conditions}) draws each question's random control from the "
                       f"questions of other passages, but sample {unserved[0].sample_id!r}'s passage has every "
                       f"question the selection holds. Select other data, {drop}.")
    ids = ", ".join(repr(s.sample_id) for s in selection[:3]) + (", ..." if len(selection) > 3 else "")
    why = (f"surrogate source random_query ({conditions}) draws each question's random control from the questions "
           "of other passages (with dataset.group_by_passage=true a passage's own questions are its sibling "
           f"primers, never its control), but dataset.n_samples={n} selects one whole passage ({len(selection)} "
           f"questions: {ids}), so there is no other passage to draw from.")
    works = _n_selecting_a_second_passage(cfg, len(selection))
    if works is None:
        raise RunError(f"{why} The data holds no second passage with at least two usable questions: use data with "
                       f"more passages, {drop}.")
    raise RunError(f"{why} Set dataset.n_samples={works} or more (passages are taken whole, in selection order; "
                   f"{works} is the smallest that selects a second passage), {drop}.")


def _n_selecting_a_second_passage(cfg: Mapping, first_size: int) -> int | None:
    """The smallest ``dataset.n_samples`` whose grouped selection holds two passages: whole passages are taken in
    selection order until they hold n questions, so one question more than the first passage has, if the data
    has a second passage (loaded again to be sure: filters may leave it none). None: no n does."""
    if cfg["dataset"].get("n_samples") is None:
        return None  # everything is selected already
    n = first_size + 1
    again = load_samples({**cfg["dataset"], "n_samples": n}, multidoc=cfg["multidoc"])
    return n if len(groups(again.samples)) > 1 else None


def _check_store(cfg: Mapping, specs: Mapping) -> None:
    """The generated-surrogate store must be writable before an hour of generation is spent."""
    if not any(sources.generated_template(s.surrogate) for s in specs.values()):
        return
    store = cfg["generation"].get("store")
    setting = "generation.store" if store else "KVPRIME_HOME (generation.store=null stores surrogates there)"
    err = rundir.unwritable(SurrogateStore(Path(store).expanduser() if store else None).root, setting)
    if err is not None:
        raise err
