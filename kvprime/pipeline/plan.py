"""What a run is, before any model loads: its checked settings, its conditions (the experiment's, or one and
the baseline), its named comparisons, this job's samples, and every check that needs no weights.

Imports nothing heavy at module level: ``kvprime report`` and ``kvprime merge`` use ``comparisons_for`` and
``shard`` without torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from ..cache import batching
from ..config import plugins, settings
from ..errors import ConfigError
from .conditions import ConditionSpec, validate


class RunError(ConfigError):
    """A configuration or run-directory problem, reported before any work is lost."""


def plain(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(cfg))


def plan_conditions(cfg: Mapping, only: str | None = None) -> dict[str, ConditionSpec]:
    """The run's conditions in order. ``only`` (``condition=<name>``) keeps that one and the baseline.

    ``experiment.cache_variant: truncated`` turns every full cache with a prefix surrogate into its
    truncated-and-corrected twin (the routing experiment's setting)."""
    from ..builders import (
        BUILDERS,  # the builders' modules import torch: only when conditions are planned
    )

    exp = cfg["experiment"]
    defined = dict(cfg.get("conditions") or {})
    baseline = exp["baseline"]
    if only is not None:
        raw, only = only, only.rsplit("/", 1)[-1]  # condition=exp01/C2_... names the condition C2_...
        chosen = dict(cfg.get("condition") or {})
        # Two sources can define it: the selected file (overridable as condition.*) and the experiment
        # (overridable as conditions.<name>.*). Whichever the user changed from the file wins; both: an error.
        from omegaconf import OmegaConf

        from ..config import confdir

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
        validate(spec, BUILDERS)
        specs[name] = spec
    return specs


def comparisons_for(exp: Mapping, defined: Mapping, names) -> list[dict]:
    """Named comparisons whose two conditions are in this run (``condition=<name>`` runs fewer)."""
    out = []
    for comp in exp.get("comparisons") or []:
        for key in ("treatment", "reference"):
            if comp[key] not in defined and comp[key] not in names:
                raise RunError(f"experiment {exp['name']!r}: comparison {comp['name']!r} names {key} "
                               f"{comp[key]!r}, which is not one of its conditions ({', '.join(defined)}).")
        if comp["treatment"] in names and comp["reference"] in names:
            out.append({k: comp[k] for k in ("name", "treatment", "reference")})
    return out


def shard(samples: list, run_cfg: Mapping, chunk: int = 1, *, grouped: bool = False) -> list:
    """This job's deterministic slice of the selection: whole chunks of ``chunk`` consecutive samples, dealt
    round-robin. Dealing the scoring chunks (``batch.samples``) whole means a shard batches exactly the samples
    the unsharded run batches together, so merged shards equal the unsharded run bit for bit. ``grouped``
    (``dataset.group_by_passage``): the chunks are whole passages (``chunks``)."""
    n, i = int(run_cfg.get("num_shards", 1)), int(run_cfg.get("shard", 0))
    if n < 1 or not 0 <= i < n:
        raise RunError(f"run.shard={i} with run.num_shards={n}: the shard must be in 0..num_shards-1 and "
                       "num_shards >= 1.")
    return [s for group in chunks(samples, chunk, grouped=grouped)[i::n] for s in group]


def chunks(samples: list, chunk: int = 1, *, grouped: bool = False) -> list[list]:
    """The scoring chunks: ``chunk`` consecutive samples, or with ``grouped`` one passage each (its questions
    share the chunk's memoised encodes: kvprime.data.passages)."""
    if grouped:
        from ..data.passages import chunks as by_passage

        return by_passage(samples)
    chunk = max(1, int(chunk))
    return [samples[k:k + chunk] for k in range(0, len(samples), chunk)]


def grouped(cfg: Mapping) -> bool:
    """``dataset.group_by_passage`` of a run config (False when absent: runs before the setting existed)."""
    return bool((cfg.get("dataset") or {}).get("group_by_passage", False))


def chunk_size(cfg: Mapping) -> int:
    """``batch.samples`` of a resolved config (``batching.resolve``; a run's config.json holds numbers)."""
    return int(cfg["batch"]["samples"])


def prepare(cfg, only: str | None = None, *, condition_selected: bool | None = None) -> dict:
    """Every check that needs no model and writes nothing: settings, conditions, routing, comparisons, RoPE
    support, and the data (loaded and selected here, so a data problem is reported before any write).
    ``condition_selected``: whether the command line selected one condition (``condition=<name>``; False refuses
    ``condition.*`` keys, which nothing would read; None: not judged). Returns the resolved config (batch sizes as numbers), the condition specs and this job's samples."""
    from ..builders import BUILDERS
    from ..cache import hf_internals as hf
    from ..cache import models
    from ..data import load_samples

    cfg = batching.resolve(settings.check(plain(cfg), condition_selected=condition_selected))
    plugins.load(cfg["plugins"])  # before the conditions: they may name a plugin's builder
    exp = cfg["experiment"]
    from ..analysis.registry import validate_analyses

    if "per_passage" in validate_analyses(exp.get("analyses")) and not grouped(cfg):
        raise RunError("experiment.analyses names per_passage, which needs the passage of every question, but "
                       "dataset.group_by_passage=false. Accepted: dataset.group_by_passage=true, or drop per_passage.")
    specs = plan_conditions(cfg, only)
    derived = [dict(r) for r in exp.get("derived") or []]
    if only is None:
        from ..analysis.routing import validate as validate_routing

        validate_routing(derived, list(specs))
        if any(r["pick"] == "max_similarity" for r in derived) and not exp.get("similarity"):
            raise RunError(f"experiment {exp['name']!r} routes by similarity (pick: max_similarity) but computes none; "
                           "set experiment.similarity=true.")
    names = list(specs) + [r["name"] for r in derived]
    comparisons_for(exp, {**(cfg.get("conditions") or {}), **{r["name"]: r for r in derived}}, names)
    _check_store(cfg, specs)
    from ..surrogates.generator import generator_model_cfg

    generator_model_cfg(cfg)  # generation.model names a usable conf/model config (nothing loaded or fetched)
    mconf = models.model_config(cfg["model"])
    for spec in specs.values():  # each builder declares the RoPE correction its settings need
        info = BUILDERS[spec.builder]
        needed = info.rope_fix(info.make_params(spec.builder_params, f"condition {spec.name!r}"))
        if needed is not None:
            hf.check_config_supports(mconf, needed)
    t = time.perf_counter()
    loaded = load_samples({**cfg["dataset"]}, multidoc=cfg["multidoc"])
    samples = shard(loaded.samples, cfg.get("run") or {}, chunk_size(cfg), grouped=grouped(cfg))
    if not samples:
        raise RunError(f"dataset {cfg['dataset']['name']!r} gave no usable samples "
                       f"({len(loaded.rejected)} rejected; e.g. {loaded.rejected[:3]}).")
    from ..surrogates import sources

    for source in dict.fromkeys(s.surrogate for s in specs.values()):
        sources.prepare(source, loaded.samples, cfg["seed"])  # a donor, a sibling: said before the model loads
    _check_random_pool(cfg, specs, loaded.samples)
    pool = [s.query for s in loaded.samples]  # random queries come from the whole selection, not the shard
    return {"cfg": cfg, "specs": specs, "only": only, "loaded": loaded, "samples": samples, "pool": pool,
            "grouped": grouped(cfg),
            "load_data_s": time.perf_counter() - t}


def _check_random_pool(cfg: Mapping, specs: Mapping, selection: list) -> None:
    """``random_query`` draws each sample's control from the whole selection's other queries (grouped by passage:
    other passages' questions). A selection that leaves a sample none is refused here, not when it is scored."""
    from ..surrogates import sources

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
    from ..data.passages import groups

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
    from ..data import load_samples
    from ..data.passages import groups

    if cfg["dataset"].get("n_samples") is None:
        return None  # everything is selected already
    n = first_size + 1
    again = load_samples({**cfg["dataset"], "n_samples": n}, multidoc=cfg["multidoc"])
    return n if len(groups(again.samples)) > 1 else None


def _check_store(cfg: Mapping, specs: Mapping) -> None:
    """The generated-surrogate store must be writable before an hour of generation is spent."""
    from ..surrogates.sources import generated_template

    if not any(generated_template(s.surrogate) for s in specs.values()):
        return
    from ..surrogates.store import SurrogateStore
    from . import rundir

    store = cfg["generation"].get("store")
    setting = "generation.store" if store else "KVPRIME_HOME (generation.store=null stores surrogates there)"
    err = rundir.unwritable(SurrogateStore(Path(store).expanduser() if store else None).root, setting)
    if err is not None:
        raise err


def builder_notes(specs: Mapping) -> list[str]:
    """Each builder's sentence for the report on the conditions it builds (stored in plan.json, so the report
    needs no builder code), once per distinct sentence, in condition order."""
    from ..builders import BUILDERS

    notes = []
    for spec in specs.values():
        info = BUILDERS[spec.builder]
        if info.notes is not None:
            text = info.notes(info.make_params(spec.builder_params, f"condition {spec.name!r}"))
            if text and text not in notes:
                notes.append(text)
    return notes


