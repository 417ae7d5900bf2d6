"""Run one experiment into one run directory: validate, load, generate surrogates, score, then finalize.

Everything that can be checked without weights (condition definitions, templates, names, RoPE support,
CUDA for 4-bit, the run directory's state) is checked first. Scores stream to ``scores.jsonl`` as they are
computed; a rerun with ``resume=true`` into the same directory scores only what is missing. Statistics,
tables, figures and the report come from the directory's files alone (``kvprime.finalize``), so
``kvprime report <run_dir>`` can redo them without a model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from . import batching, interrupts, metadata, models, settings, surrogates
from . import hf_internals as hf
from .builders import BUILDERS
from .conditions import ConditionSpec, validate
from .data import load_samples
from .engine import Engine
from .errors import ConfigError, RunDirError
from .results_io import ScoreLog, dumps, read_jsonl, write_json, write_jsonl

# Keys that may differ between a run and its resumption.
_RESUME_FREE = ("resume", "progress", "batch")  # batching changes no number beyond float rounding (tested <= 1e-4)


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
    exp = cfg["experiment"]
    defined = dict(cfg.get("conditions") or {})
    baseline = exp["baseline"]
    if only is not None:
        raw, only = only, only.rsplit("/", 1)[-1]  # condition=exp01/C2_... names the condition C2_...
        chosen = dict(cfg.get("condition") or {})
        # Two sources can define it: the selected file (overridable as condition.*) and the experiment
        # (overridable as conditions.<name>.*). Whichever the user changed from the file wins; both: an error.
        from omegaconf import OmegaConf

        from . import confdir

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


def _check_resume(run_dir: Path, cfg: dict) -> None:
    stored_path = run_dir / "config.json"
    if not stored_path.exists():
        return
    stored = json.loads(stored_path.read_text())

    def relevant(c: Mapping) -> dict:
        out = {k: v for k, v in c.items() if k not in _RESUME_FREE}
        if isinstance(out.get("generation"), Mapping):  # the generation batch size changes no surrogate
            out["generation"] = {k: v for k, v in out["generation"].items() if k != "batch_size"}
        return out

    now, old = json.loads(dumps(relevant(cfg))), relevant(stored)
    diff = sorted(k for k in set(now) | set(old) if now.get(k) != old.get(k))
    if diff:
        raise RunDirConflict(f"resume=true, but the configuration differs from the one {run_dir} was started with in "
                       f"{diff}. Resume with the original overrides (see {stored_path}), or start a new run.")


def _model_id(model_cfg: Mapping, info: Mapping) -> str:
    """What generated surrogates are keyed on: the model's name and a digest of its weights, hub revision,
    dtype and quantization (any of them changes what the model writes)."""
    weights = json.dumps([info.get("weights_sha256") or info.get("path") or "", info.get("commit"),
                          model_cfg.get("dtype"), model_cfg.get("quantization"), model_cfg.get("compute_dtype")],
                         sort_keys=True)
    return f"{model_cfg.get('name')}:{hashlib.sha256(weights.encode()).hexdigest()[:16]}"


def generate_surrogates(cfg: Mapping, specs: Mapping, samples, model, tokenizer, model_id: str,
                        progress: bool) -> dict:
    """(template, sample_id) -> text for every ``generated:<template>`` source; the store is filled first."""
    templates = sorted({s.surrogate.split(":", 1)[1] for s in specs.values() if s.surrogate.startswith("generated:")})
    if not templates:
        return {}
    from .generation import GenerationSettings
    from .surrogate_store import SurrogateStore, ensure

    # Callers that composed their own config (walkthrough) may still hold batch_size=auto.
    gcfg = batching.resolve(cfg, device=str(next(model.parameters()).device))["generation"]
    settings = GenerationSettings(**{k: gcfg[k] for k in ("temperature", "max_new_tokens", "seed", "batch_size", "clean")
                                     if k in gcfg})
    store = SurrogateStore(Path(gcfg["store"]).expanduser()) if gcfg.get("store") else SurrogateStore()
    out = {}
    for template in templates:
        texts = ensure(store, model, tokenizer, model_id=model_id, template_name=template,
                       documents=[s.passage for s in samples], settings=settings, progress=progress)
        out.update({(template, s.sample_id): t for s, t in zip(samples, texts)})
    return out


def shard(samples: list, run_cfg: Mapping, chunk: int = 1) -> list:
    """This job's deterministic slice of the selection: whole chunks of ``chunk`` consecutive samples, dealt
    round-robin. Dealing the scoring chunks (``batch.samples``) whole means a shard batches exactly the samples
    the unsharded run batches together, so merged shards equal the unsharded run bit for bit."""
    n, i = int(run_cfg.get("num_shards", 1)), int(run_cfg.get("shard", 0))
    if n < 1 or not 0 <= i < n:
        raise RunError(f"run.shard={i} with run.num_shards={n}: the shard must be in 0..num_shards-1 and "
                       "num_shards >= 1.")
    chunk = max(1, int(chunk))
    groups = [samples[k:k + chunk] for k in range(0, len(samples), chunk)]
    return [s for group in groups[i::n] for s in group]


def chunk_size(cfg: Mapping) -> int:
    """``batch.samples`` of a resolved config (``batching.resolve``; a run's config.json holds numbers)."""
    return int(cfg["batch"]["samples"])


def _complete(run_dir: Path, samples, names) -> bool:
    """A finished run: every (sample, condition) scored and the metadata written."""
    if not (run_dir / "metadata.json").exists() or not (run_dir / "scores.jsonl").exists():
        return False
    meta = json.loads((run_dir / "metadata.json").read_text())
    skipped = {s["sample_id"] for s in meta.get("skipped", [])}
    done = {(r["sample_id"], r["condition"]) for r in read_jsonl(run_dir / "scores.jsonl")}
    return all((s.sample_id, n) in done for s in samples if s.sample_id not in skipped for n in names)


def _row(sample, name, seg, primed, score, resolved, similarity, save_tokens, per_token) -> dict:
    row = {"sample_id": sample.sample_id, "condition": name, "nll": score.nll, "nll_sum": score.nll_sum,
           "n_answer_tokens": score.n_answer_tokens, "cache_len": len(primed), "next_position": primed.next_position,
           "encoded_tokens": primed.encoded_tokens, "surrogate": resolved[sample.sample_id][name],
           "similarity": similarity.get(sample.sample_id, {}).get(name)}
    if not score.finite:
        row["nonfinite"] = repr(score.nll)
    if save_tokens:
        row.update(cache_token_ids=primed.token_ids, cache_position_ids=primed.position_ids,
                   prompt_token_ids=list(seg.prompt), answer_token_ids=list(seg.answer),
                   kept_segments=list(primed.kept_segments),
                   segment_token_ids={k: list(getattr(seg, k)) for k in ("sink", "prefix", "document", "suffix")})
    if per_token:
        row["token_logprobs"] = score.token_logprobs
    return row


def fill_surrogate_store(cfg) -> dict[str, int]:
    """``kvprime surrogates generate``: the generation step of a run, alone."""
    cfg = batching.resolve(settings.check(plain(cfg)))
    specs = plan_conditions(cfg)
    samples = load_samples({**cfg["dataset"]}).samples
    model, tokenizer, info = models.load(cfg["model"])
    generated = generate_surrogates(cfg, specs, samples, model, tokenizer, _model_id(cfg["model"], info),
                                    progress=cfg["progress"])
    counts: dict[str, int] = {}
    for template, _ in generated:
        counts[template] = counts.get(template, 0) + 1
    return counts


class RunDirConflict(RunError, RunDirError):
    """The run directory holds another run, or another writer holds it."""


# A directory holding any of these holds a run (started, killed or finished).
RUN_FILES = ("config.json", "plan.json", "inputs.jsonl", "scores.jsonl", "metadata.json", "results.json")


def prepare(cfg, only: str | None = None) -> dict:
    """Every check that needs no model and writes nothing: settings, conditions, routing, comparisons, RoPE
    support, and the data (loaded and selected here, so a data problem is reported before any write).
    Returns the resolved config (batch sizes as numbers), the condition specs and this job's samples."""
    cfg = batching.resolve(settings.check(plain(cfg)))
    exp = cfg["experiment"]
    specs = plan_conditions(cfg, only)
    derived = [dict(r) for r in exp.get("derived") or []]
    if only is None:
        from .routing import validate as validate_routing

        validate_routing(derived, list(specs))
        if any(r["pick"] == "max_similarity" for r in derived) and not exp.get("similarity"):
            raise RunError(f"experiment {exp['name']!r} routes by similarity (pick: max_similarity) but computes none; "
                           "set experiment.similarity=true.")
    names = list(specs) + [r["name"] for r in derived]
    comparisons_for(exp, {**(cfg.get("conditions") or {}), **{r["name"]: r for r in derived}}, names)
    _check_store(cfg, specs)
    mconf = models.model_config(cfg["model"])
    for spec in specs.values():
        if spec.truncates_prefix:
            hf.check_config_supports(mconf, spec.rope_fix)
    t = time.perf_counter()
    loaded = load_samples({**cfg["dataset"]})
    samples = shard(loaded.samples, cfg.get("run") or {}, chunk_size(cfg))
    if not samples:
        raise RunError(f"dataset {cfg['dataset']['name']!r} gave no usable samples "
                       f"({len(loaded.rejected)} rejected; e.g. {loaded.rejected[:3]}).")
    pool = [s.query for s in loaded.samples]  # random queries come from the whole selection, not the shard
    return {"cfg": cfg, "specs": specs, "only": only, "loaded": loaded, "samples": samples, "pool": pool,
            "load_data_s": time.perf_counter() - t}


def _check_store(cfg: Mapping, specs: Mapping) -> None:
    """The generated-surrogate store must be writable before an hour of generation is spent."""
    if not any(s.surrogate.startswith("generated:") for s in specs.values()):
        return
    from . import rundir
    from .surrogate_store import SurrogateStore

    store = cfg["generation"].get("store")
    setting = "generation.store" if store else "KVPRIME_HOME (generation.store=null stores surrogates there)"
    err = rundir.unwritable(SurrogateStore(Path(store).expanduser() if store else None).root, setting)
    if err is not None:
        raise err


def check_run_dir(run_dir: Path, cfg: Mapping) -> None:
    """Refuse, without writing anything, a directory another writer holds, or one that holds another run
    (unless resuming it with the configuration it was started with)."""
    from . import rundir

    h = rundir.live_holder(run_dir)
    if h is not None:
        raise RunDirConflict(str(rundir.busy_error(run_dir, h)))
    if cfg.get("resume"):
        _check_resume(run_dir, cfg)
        return
    held = [f for f in RUN_FILES if (run_dir / f).exists()]
    if held:
        raise RunDirConflict(f"{run_dir} already holds a run ({', '.join(held)}). Continue it with `kvprime resume "
                             f"{run_dir}` (or resume=true with the same overrides), or let kvprime make a new run "
                             "directory (leave hydra.run.dir unset).")


@contextmanager
def claim(run_dir: Path, cfg: Mapping, command: str = "run"):
    """Make (if needed), check and lock ``run_dir`` for this run; the lock is held until the block ends."""
    from . import rundir

    rundir.make_dirs(run_dir, "hydra.run.dir (the run directory)")
    check_run_dir(run_dir, cfg)  # before the lock file is made: a refused run leaves the directory as it was
    lock = rundir.RunLock(run_dir, command).acquire()
    try:
        check_run_dir(run_dir, cfg)  # again, now that no other writer can start
        from .results_io import remove_stale_temps

        remove_stale_temps(run_dir)  # a killed writer's half-written temporaries
        yield lock
    finally:
        lock.release()


def run_experiment(cfg, run_dir, *, only: str | None = None, progress: bool | None = None,
                   on_claimed=None) -> dict:
    """Run ``cfg`` (a Hydra/OmegaConf config or plain dict) into ``run_dir``; returns ``results.json``'s dict.

    Nothing is written before every model-free check has passed and the directory is locked for this run;
    ``on_claimed(run_dir)`` is called once it is (the CLI writes Hydra's record of the run there)."""
    t0 = time.perf_counter()
    prepared = prepare(cfg, only)
    run_dir = Path(run_dir)
    with claim(run_dir, prepared["cfg"], "resume" if prepared["cfg"].get("resume") else "run"):
        if on_claimed is not None:
            on_claimed(run_dir)
        return _execute(prepared, run_dir, progress, t0)


def _execute(prepared: dict, run_dir: Path, progress: bool | None, t0: float) -> dict:
    timings: dict[str, float] = {}
    peaks: dict[str, int] = {}  # the process's peak resident memory after each stage (MB; it never goes down)
    cfg, specs, only = prepared["cfg"], prepared["specs"], prepared["only"]
    exp = cfg["experiment"]
    seed = cfg["seed"]
    progress = cfg["progress"] if progress is None else progress
    model_cfg = cfg["model"]
    write_json(run_dir / "config.json", cfg)
    write_json(run_dir / "plan.json", {"only": only, "conditions": {n: s.to_dict() for n, s in specs.items()}})
    timings["validate"] = time.perf_counter() - t0 - prepared["load_data_s"]

    loaded, samples, pool = prepared["loaded"], prepared["samples"], prepared["pool"]
    timings["load_data"] = prepared["load_data_s"]
    if cfg.get("resume") and _complete(run_dir, samples, list(specs)):
        from .finalize import finalize

        return finalize(run_dir)  # a finished job in a rerun sweep: nothing to load, nothing to score

    t = time.perf_counter()
    model, tokenizer, model_info = models.load(model_cfg)
    engine = Engine(model, tokenizer, sink=model_cfg["sink"], max_context=model_cfg.get("max_context"))
    timings["load_model"] = time.perf_counter() - t
    peaks["load_model"] = metadata.peak_rss_mb()

    t = time.perf_counter()
    generated = generate_surrogates(cfg, specs, samples, model, tokenizer, _model_id(model_cfg, model_info), progress)
    timings["generate_surrogates"] = time.perf_counter() - t
    peaks["generate_surrogates"] = metadata.peak_rss_mb()
    resolved = {
        s.sample_id: {name: surrogates.resolve(spec.surrogate, s, pool=pool, seed=seed, tokenizer=tokenizer,
                                               n_tokens=spec.random_tokens, generated=generated)
                      for name, spec in specs.items()}
        for s in samples
    }
    t = time.perf_counter()
    similarity = _similarities(samples, resolved) if exp.get("similarity") else {}
    timings["similarity"] = time.perf_counter() - t
    peaks["similarity"] = metadata.peak_rss_mb()

    inputs = [{**s.to_dict(), "surrogates": resolved[s.sample_id],
               "similarity": similarity.get(s.sample_id, {})} for s in samples]
    inputs_path = run_dir / "inputs.jsonl"
    if inputs_path.exists() and cfg.get("resume"):
        # Samples and surrogate texts must match; similarities are floats that may differ in the last bits
        # on another machine, and are recomputed anyway.
        def same(rows):
            return [{k: v for k, v in r.items() if k != "similarity"} for r in rows]

        if same(read_jsonl(inputs_path)) != same(json.loads(dumps(r)) for r in inputs):
            raise RunError(f"resume=true, but the samples now selected differ from {inputs_path}. The data or the "
                           "loader changed; start a new run.")
    write_jsonl(inputs_path, inputs)

    t = time.perf_counter()
    skipped, repaired = _score_all(cfg, engine, specs, samples, resolved, similarity, run_dir, progress)
    timings["score"] = time.perf_counter() - t
    peaks["score"] = metadata.peak_rss_mb()

    scoring_encodes, scoring_tokens = engine.n_encodes, engine.n_encoded_tokens
    inspect_result = None
    wanted = exp.get("inspect")
    scored = [s for s in samples if s.sample_id not in {k["sample_id"] for k in skipped}]
    if wanted and scored and all(c in specs for c in wanted):
        from .inspect_cache import inspect_pair

        engine.forget()
        inspect_result = inspect_pair(engine, scored[0], {c: specs[c] for c in wanted}, pool=pool, seed=seed,
                                      generated=generated)
        write_json(run_dir / "inspect.json", inspect_result)

    timings["total_before_report"] = time.perf_counter() - t0
    write_json(run_dir / "metadata.json", {
        "versions": metadata.versions(), "git": metadata.git_state(), "seed": seed,
        "environment": metadata.environment(engine.device),
        "model": {"name": model_cfg.get("name"), "dtype": model_cfg.get("dtype"), "sink": engine.sink_policy,
                  "sink_token_ids": engine.sink,
                  "bos_added_by_tokenizer": tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id],
                  "quantization": model_cfg.get("quantization"),
                  "max_context": engine.max_context, "sliding_windows": sorted(set(engine.windows)), **model_info},
        "dataset": {"name": cfg["dataset"].get("name"), "n_samples": cfg["dataset"].get("n_samples"),
                    "selection": cfg["dataset"].get("selection"), "selection_seed": cfg["dataset"].get("seed"),
                    "sample_ids_sha256": metadata.sample_ids_sha256([s.sample_id for s in samples]),
                    "candidates": loaded.n_candidates, "rejected": [dict(r) for r in loaded.rejected]},
        "skipped": skipped,
        "log_lines_repaired_on_resume": repaired,
        "model_encodes": scoring_encodes, "encoded_tokens": scoring_tokens,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": metadata.peak_rss_mb(), "peak_rss_mb_after": peaks,
        "run_dir": str(run_dir.resolve()),
    })
    from .finalize import finalize

    return finalize(run_dir)


def _similarities(samples, resolved) -> dict:
    """sample_id -> {condition: cos(surrogate, query)} for every condition that has a surrogate."""
    from .similarity import Embedder

    pairs, keys = [], []
    for s in samples:
        for name, text in resolved[s.sample_id].items():
            if text is not None:
                pairs.append((text, s.query))
                keys.append((s.sample_id, name))
    out: dict = {}
    for (sid, name), value in zip(keys, Embedder().cosine_pairs(pairs)):
        out.setdefault(sid, {})[name] = value
    return out


def _score_all(cfg, engine, specs, samples, resolved, similarity, run_dir, progress):
    """Score in chunks of samples: the chunk's distinct encodes run as padded batches, then every
    (sample, condition) of the chunk is scored in batches, and its lines are appended before the next chunk."""
    from tqdm.auto import tqdm

    skipped, on_too_long = [], cfg["on_too_long"]
    save_tokens, per_token = cfg["save_tokens"], cfg["per_token"]
    chunk = chunk_size(cfg)
    encode_tokens, score_tokens = int(cfg["batch"]["encode_tokens"]), int(cfg["batch"]["score_tokens"])
    with ScoreLog(run_dir / "scores.jsonl") as log:
        bar = tqdm(total=len(samples), desc=f"{cfg['experiment']['name']} ({len(specs)} conditions)",
                   unit="sample", disable=not progress)
        for first in range(0, len(samples), chunk):
            work = []  # (sample, condition name, segments)
            for sample in samples[first:first + chunk]:
                segs = {name: engine.segments(spec, document=sample.passage, query=sample.query,
                                              answer=sample.answer, surrogate=resolved[sample.sample_id][name])
                        for name, spec in specs.items()}
                too_long = [n for n, spec in specs.items() if not engine.fits(segs[n], spec)]
                if too_long:
                    need = max(len(segs[n]) + specs[n].position_offset for n in too_long)
                    limit = min([w for w in [engine.max_context, *engine.windows] if w])
                    reason = f"needs {need} tokens in condition {too_long[0]!r}; the model's limit is {limit}"
                    if on_too_long == "error":
                        raise RunError(f"sample {sample.sample_id!r} {reason} (on_too_long=error; use "
                                       "on_too_long=skip to skip and count such samples).")
                    skipped.append({"sample_id": sample.sample_id, "reason": reason})
                    continue
                work += [(sample, name, segs[name]) for name in specs]
            # A chunk is scored whole or not at all: a resumed run redoes a partly logged chunk with the same
            # batches as the uninterrupted run (smaller batches round differently in float32), and appends
            # only the missing lines.
            if all((sample.sample_id, name) in log.done for sample, name, _ in work):
                bar.update(min(chunk, len(samples) - first))
                continue
            done = engine.run_chunk([(specs[name], seg) for _, name, seg in work], per_token=per_token,
                                    encode_tokens=encode_tokens, score_tokens=score_tokens)
            for (sample, name, seg), (pc, score) in zip(work, done):
                if (sample.sample_id, name) in log.done:
                    continue
                with interrupts.record_boundary():
                    log.append(_row(sample, name, seg, pc, score, resolved, similarity, save_tokens, per_token))
            engine.forget()
            bar.update(min(chunk, len(samples) - first))
        bar.close()
        n_rows, repaired = len(log.rows), log.repaired
    if not n_rows:
        raise RunError(f"no sample was scored: all {len(samples)} selected samples were skipped "
                       f"(first reason: {skipped[0]['reason'] if skipped else 'none'}). Use shorter passages "
                       "(dataset.filters.max_passage_words) or a model with a longer context.")
    return skipped, repaired
