"""Run one experiment into one run directory: validate, load, generate surrogates, score, then finalize.

Everything that can be checked without weights (condition definitions, templates, names, RoPE support,
CUDA for 4-bit, the surrogate sources' pools, token lengths with ``on_too_long=error``, the run directory's state
and the kvprime that started it) is checked first. Scores stream to ``scores.jsonl`` as they are
computed; a rerun with ``resume=true`` into the same directory scores only what is missing. Statistics,
tables, figures and the report come from the directory's files alone (``kvprime.reporting.finalize``), so
``kvprime report <run_dir>`` can redo them without a model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path

from tqdm.auto import tqdm

from ..analysis import cost
from ..builders import floor as numerical_floor
from ..config import settings
from ..data import OPTIONS
from ..data.passages import passage_id
from ..errors import RunDirError, RunError
from ..files import rundir
from ..files.results_io import ScoreLog, dumps, iter_jsonl, remove_stale_temps, write_json, write_jsonl
from ..models import loading
from ..reporting import finalize
from . import interrupts, metadata
from .answering import answer_fields
from .inspect import inspect_pair
from .plan import prepare
from .session import Session
from .sharding import chunk_size, chunks, grouped

# Keys that may differ between a run and its resumption.
# Batching changes no number beyond float rounding (tested <= 1e-4); tracking only where a finished run is logged.
_RESUME_FREE = ("resume", "progress", "batch", "tracking")


def _check_resume(run_dir: Path, cfg: Mapping) -> None:
    stored_path = run_dir / "config.json"
    if not stored_path.exists():
        return
    stored = json.loads(stored_path.read_text())
    # A run started before the answer metric, multidoc or group_by_passage existed: its missing keys take their
    # defaults (NLL only, one passage a sample, ungrouped), which is what it ran with.
    stored = json.loads(dumps(settings.check(stored, only=("metrics", "answer", "multidoc", "dataset"),
                                             origin=str(stored_path), loader_options=OPTIONS)))

    def relevant(c: Mapping) -> dict:
        out = {k: v for k, v in c.items() if k not in _RESUME_FREE}
        if (c.get("run") or {}).get("num_shards", 1) > 1:  # batch.samples deals a shard its samples
            out["batch.samples"] = (c.get("batch") or {}).get("samples")
        # neither the batch size nor the shared prefix changes a surrogate
        if isinstance(out.get("generation"), Mapping):
            out["generation"] = {k: v for k, v in out["generation"].items() if k not in ("batch_size", "shared_prefix")}
        return out

    now, old = json.loads(dumps(relevant(cfg))), relevant(stored)
    added, removed, changed = _config_diff(now, old)
    if added or removed:
        raise RunDirConflict(_version_changed(run_dir, added, removed, changed))
    diff = sorted(k for k in set(now) | set(old) if now.get(k) != old.get(k))
    if diff:
        raise RunDirConflict(f"resume=true, but the configuration differs from the one {run_dir} was started with in "
                             f"{diff}. Resume with the original overrides (see {stored_path}), or start a new run.")


def _config_diff(now: Mapping, old: Mapping, prefix: str = "") -> tuple[list, list, list]:
    """Dotted settings only in ``now`` (added to kvprime since ``old`` was written), only in ``old`` (removed
    since), and in both with other values (overridden); a missing section is named once, not key by key."""
    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []
    for key in sorted(set(now) | set(old)):
        path = f"{prefix}{key}"
        if key not in old:
            added.append(path)
        elif key not in now:
            removed.append(path)
        elif isinstance(now[key], Mapping) and isinstance(old[key], Mapping):
            nested = _config_diff(now[key], old[key], f"{path}.")
            for mine, theirs in zip((added, removed, changed), nested, strict=True):
                mine += theirs
        elif now[key] != old[key]:
            changed.append(path)
    return added, removed, changed


def _version_changed(run_dir: Path, added: list, removed: list, changed: list) -> str:
    """The paragraph for resuming a directory another kvprime started: its settings are not this kvprime's."""
    then, now = metadata.recorded_identity(run_dir), metadata.identity()
    what = []
    if added:
        what.append(f"this kvprime has settings added since, which its config.json lacks: {', '.join(added)}")
    if removed:
        what.append(f"its config.json has settings this kvprime no longer has: {', '.join(removed)}")
    if changed:
        what.append(f"besides, these settings differ from the ones it was started with: {', '.join(changed)}")
    finish = f"{metadata.how_to_get(then, now)}, then `kvprime resume {run_dir}`"
    return (f"resume=true, but {run_dir} was started by {metadata.describe(then)}, and this is "
            f"{metadata.describe(now)}: {'; '.join(what)}. This is a change of kvprime version, not an override "
            f"that can be undone on the command line. Either finish the run with the version that started it "
            f"({finish}), or start a new run with this version (leave hydra.run.dir unset). Nothing in {run_dir} "
            "was changed.")


def _complete(run_dir: Path, samples, names) -> bool:
    """A finished run: every (sample, condition) scored and the metadata written."""
    if not (run_dir / "metadata.json").exists() or not (run_dir / "scores.jsonl").exists():
        return False
    meta = json.loads((run_dir / "metadata.json").read_text())
    skipped = {s["sample_id"] for s in meta.get("skipped", [])}
    done = {(r["sample_id"], r["condition"]) for r in iter_jsonl(run_dir / "scores.jsonl")}
    return all((s.sample_id, n) in done for s in samples if s.sample_id not in skipped for n in names)


def _row(sample, name, seg, primed, score, surrogate, similarity, save_tokens, per_token, cost) -> dict:
    row = {"sample_id": sample.sample_id, "condition": name, "nll": score.nll, "nll_sum": score.nll_sum,
           "n_answer_tokens": score.n_answer_tokens, "cache_len": len(primed), "next_position": primed.next_position,
           "encoded_tokens": primed.encoded_tokens, "prompt_tokens": len(seg.prompt),
           "surrogate": surrogate,
           "similarity": similarity.get(sample.sample_id, {}).get(name), **cost,
           **primed.notes.get("query_work", {})}  # a recompute's query-time work (kvprime.analysis.cost)
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


class RunDirConflict(RunError, RunDirError):
    """The run directory holds another run, or another writer holds it."""


# A directory holding any of these holds a run (started, killed or finished).
RUN_FILES = (metadata.VERSION_FILE, "config.json", "plan.json", "inputs.jsonl", "scores.jsonl", "metadata.json",
             "results.json")


def check_run_dir(run_dir: Path, cfg: Mapping) -> None:
    """Refuse, without writing anything, a directory another writer holds, or one that holds another run
    (unless resuming it with the configuration it was started with)."""
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
    rundir.make_dirs(run_dir, "hydra.run.dir (the run directory)")
    check_run_dir(run_dir, cfg)  # before the lock file is made: a run refused here leaves the directory as it was
    lock = rundir.RunLock(run_dir, command).acquire()
    try:
        check_run_dir(run_dir, cfg)  # again, now that no other writer can start
        remove_stale_temps(run_dir)  # a killed writer's half-written temporaries
        yield lock
    finally:
        lock.release()


def run_experiment(cfg, run_dir, *, only: str | None = None, progress: bool | None = None,
                   on_claimed=None, on_failure=None, condition_selected: bool | None = None,
                   plugin_dirs: Sequence = (), command: Sequence[str] | None = None) -> dict:
    """Run ``cfg`` (a Hydra/OmegaConf config or plain dict) into ``run_dir``; returns ``results.json``'s dict.

    Nothing is written before every model-free check has passed and the directory is locked for this run;
    ``on_claimed(run_dir)`` is called once it is (the CLI writes Hydra's record of the run there), and
    ``on_failure(err)`` when the run then fails, still under the lock, so what a failed run leaves behind is
    settled before another command can take the directory. ``plugin_dirs``: where plugins are looked for besides
    the current directory (the CLI passes the run's config folders); ``command``: the command line metadata.json
    records (default ``sys.argv``)."""
    t0 = time.perf_counter()
    session = Session(prepare(cfg, only, condition_selected=condition_selected, plugin_dirs=plugin_dirs))
    check_lengths(session)
    run_dir = Path(run_dir)
    with claim(run_dir, session.cfg, "resume" if session.cfg.get("resume") else "run"):
        try:
            if on_claimed is not None:
                on_claimed(run_dir)
            shown = session.cfg["progress"] if progress is None else progress
            with loading.loading_bars(shown):
                results = _execute(session, run_dir, progress, t0, command)
        except BaseException as err:
            if on_failure is not None:
                on_failure(err)
            raise
        (run_dir / "error.json").unlink(missing_ok=True)  # an earlier failure's record, now resumed past
        return results


def check_lengths(session) -> None:
    """With ``on_too_long=error``, refuse a sample too long for the model before any weights load: the tokenizer
    and the model's config (its context, its sliding windows) are read without them.

    Checked here, exactly as scoring checks them: every condition whose surrogate text needs no model (none,
    query, random_query, static, sibling_query, random_tokens, a plugin's source) and every generated one the
    store already holds. Checked late, when the sample is scored (``_score_all``): a generated surrogate the
    store lacks, whose length is known only once the generator has written it, which needs its weights."""
    if session.cfg["on_too_long"] != "error":
        return
    for sample in session.samples:  # one at a time: what is read for the check stays for the run
        session.surrogate_service.read_stored([sample])
        reason = _too_long(session.checks_engine, session.specs, session.known_segments(sample))
        if reason is not None:
            raise _too_long_error(sample, reason)


def _too_long(engine, specs, segs) -> str | None:
    """Why a sample's spans (condition -> Segments) do not fit the model, or None when they all fit."""
    too_long = [n for n in segs if not engine.fits(segs[n], specs[n])]
    if not too_long:
        return None
    need = max(len(segs[n]) + specs[n].position_offset for n in too_long)
    limit = min([w for w in [engine.max_context, *engine.windows] if w])
    return f"needs {need} tokens in condition {too_long[0]!r}; the model's limit is {limit}"


def _too_long_error(sample, reason: str) -> RunError:
    return RunError(f"sample {sample.sample_id!r} {reason} (on_too_long=error; use on_too_long=skip to skip and "
                    "count such samples).")


def _execute(session, run_dir: Path, progress: bool | None, t0: float, command: Sequence[str] | None) -> dict:
    timings: dict[str, float] = {}
    peaks: dict[str, int] = {}  # the process's peak resident memory after each stage (MB; it never goes down)
    plan, service = session.plan, session.surrogate_service
    cfg, specs = plan.cfg, plan.conditions
    exp = cfg["experiment"]
    seed = cfg["seed"]
    progress = cfg["progress"] if progress is None else progress
    model_cfg = cfg["model"]
    if not (run_dir / "config.json").exists() and not (run_dir / metadata.VERSION_FILE).exists():
        write_json(run_dir / metadata.VERSION_FILE, metadata.identity())  # once: the kvprime that started the run
    write_json(run_dir / "config.json", cfg)
    plan.write(run_dir)
    timings["validate"] = time.perf_counter() - t0 - plan.load_data_s

    loaded, samples = plan.selection, plan.samples
    timings["load_data"] = plan.load_data_s
    if cfg.get("resume") and _complete(run_dir, samples, list(specs)):
        return finalize.finalize(run_dir)  # a finished job in a rerun sweep: nothing to load, nothing to score

    t = time.perf_counter()
    tokenizer, model_info, engine = session.tokenizer, session.model_info, session.engine
    timings["load_model"] = time.perf_counter() - t
    peaks["load_model"] = metadata.peak_rss_mb()
    # Measured on every start (a resumed run too: it may score on another machine), before anything is
    # generated or scored: a run whose re-rotation is above floor.max_nll_diff stops here.
    t = time.perf_counter()
    floor = numerical_floor.for_run(cfg.get("floor"), specs, session.model, tokenizer, sink_ids=engine.sink,
                                    max_context=engine.max_context)
    timings["numerical_floor"] = time.perf_counter() - t

    t = time.perf_counter()
    session.generate(progress=progress)
    timings["generate_surrogates"] = time.perf_counter() - t
    peaks["generate_surrogates"] = metadata.peak_rss_mb()
    t = time.perf_counter()
    similarity = session.similarities() if exp.get("similarity") else {}
    timings["similarity"] = time.perf_counter() - t
    peaks["similarity"] = metadata.peak_rss_mb()

    def inputs():  # one line at a time: a run's memory must not grow with its samples
        for s in samples:
            yield {**s.to_dict(), "surrogates": session.surrogates(s), "similarity": similarity.get(s.sample_id, {})}

    inputs_path = run_dir / "inputs.jsonl"
    if inputs_path.exists() and cfg.get("resume"):
        # Samples and surrogate texts must match; similarities are floats that may differ in the last bits
        # on another machine, and are recomputed anyway.
        def same(row):
            return {k: v for k, v in row.items() if k != "similarity"}

        stored, now = iter_jsonl(inputs_path), (json.loads(dumps(r)) for r in inputs())
        if any(a is None or b is None or same(a) != same(b) for a, b in zip_longest(stored, now)):
            raise RunError(f"resume=true, but the samples now selected differ from {inputs_path}. The data or the "
                           "loader changed; start a new run.")
    write_jsonl(inputs_path, inputs())

    t = time.perf_counter()
    skipped, repaired = _score_all(session, similarity, run_dir, progress)
    timings["score"] = time.perf_counter() - t
    peaks["score"] = metadata.peak_rss_mb()

    scoring_encodes, scoring_tokens, openings = engine.n_encodes, engine.n_encoded_tokens, engine.n_openings
    inspect_result = None
    wanted = exp.get("inspect")
    scored = [s for s in samples if s.sample_id not in {k["sample_id"] for k in skipped}]
    if wanted and scored and all(c in specs for c in wanted):
        engine.forget()
        inspect_result = inspect_pair(session, scored[0], wanted)
        write_json(run_dir / "inspect.json", inspect_result)

    timings["total_before_report"] = time.perf_counter() - t0
    write_json(run_dir / "metadata.json", {
        "versions": metadata.versions(), "git": metadata.git_state(), "seed": seed,
        "environment": metadata.environment(engine.device, command),
        "model": {"name": model_cfg.get("name"), "dtype": model_cfg.get("dtype"), "sink": engine.sink_policy,
                  "sink_token_ids": engine.sink,
                  "bos_added_by_tokenizer": tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id],
                  "quantization": model_cfg.get("quantization"),
                  "max_context": engine.max_context, "sliding_windows": sorted(set(engine.windows)), **model_info},
        "generation": service.generation_info(),  # the generator and templates, None when nothing is generated
        # for the reports' FLOP counts (kvprime.analysis.cost), without loading the model again
        "model_shape": cost.model_shape(session.model.config),
        "generator_shape": cost.model_shape(service.generator_config) if service.generator_config else None,
        "dataset": {"name": cfg["dataset"].get("name"), "n_samples": cfg["dataset"].get("n_samples"),
                    "selection": cfg["dataset"].get("selection"), "selection_seed": cfg["dataset"].get("seed"),
                    "sample_ids_sha256": metadata.sample_ids_sha256([s.sample_id for s in samples]),
                    "candidates": loaded.n_candidates, "rejected": [dict(r) for r in loaded.rejected]},
        "numerical_floor": floor,  # stable keys: measured, dtype, max_nll_abs_diff (the stats' tie tolerance)
        "skipped": skipped,
        "log_lines_repaired_on_resume": repaired,
        "model_encodes": scoring_encodes, "encoded_tokens": scoring_tokens,
        "shared_openings_encoded": openings,  # of model_encodes: openings several encodes continued from
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": metadata.peak_rss_mb(), "peak_rss_mb_after": peaks,
        "run_dir": str(run_dir.resolve()),
    })
    return finalize.finalize(run_dir)


def _chunk_costs(session, work, done, seconds, shape) -> list[dict]:
    """Per (sample, condition) of a chunk: its share of the chunk's measured seconds (in proportion to its FLOPs,
    kvprime.analysis.cost) and what generating its surrogates cost (``SurrogateService.generation_cost``)."""
    index_f = [cost.forward_flops(shape, pc.encoded_tokens) for pc, _ in done]
    # A recompute stage runs inside the build but is query-time work: its measured seconds (recorded per sample
    # as recompute_s) are not indexing's to share.
    index_s = max(seconds["index"] - sum(pc.notes.get("query_work", {}).get("recompute_s", 0.0) for pc, _ in done),
                  0.0)
    query_f = [cost.forward_flops(shape, len(seg.prompt) + len(seg.answer), len(pc), len(seg.answer) + 1)
               for (_, _, seg), (pc, _) in zip(work, done, strict=True)]
    out = []
    for (sample, name, _), fi, fq in zip(work, index_f, query_f, strict=True):
        row = {"encode_s": round(index_s * fi / (sum(index_f) or 1), 6),
               "score_s": round(seconds["score"] * fq / (sum(query_f) or 1), 6)}
        g = session.surrogate_service.generation_cost(session.specs[name], sample)
        if g is not None:  # a source that generates
            row.update(generation_prompt_tokens=g.get("prompt_tokens"),
                       generation_shared_tokens=g.get("shared_prompt_tokens"),
                       generated_tokens=g.get("generated_tokens"),
                       generation_s=g.get("seconds"))
        out.append(row)
    return out


def _score_all(session, similarity, run_dir, progress):
    """Score in chunks of samples: the chunk's distinct encodes run as padded batches, then every
    (sample, condition) of the chunk is scored in batches, and its lines are appended before the next chunk."""
    cfg, engine, specs, samples = session.cfg, session.engine, session.specs, session.samples
    skipped, on_too_long = [], cfg["on_too_long"]
    save_tokens, per_token = cfg["save_tokens"], cfg["per_token"]
    chunk, by_passage = chunk_size(cfg), grouped(cfg)
    encode_tokens, score_tokens = int(cfg["batch"]["encode_tokens"]), int(cfg["batch"]["score_tokens"])
    shape = cost.model_shape(session.model.config)
    with ScoreLog(run_dir / "scores.jsonl") as log:
        bar = tqdm(total=len(samples), desc=f"{cfg['experiment']['name']} ({len(specs)} conditions)",
                   unit="sample", disable=not progress)
        for group in chunks(samples, chunk, grouped=by_passage):
            work = []  # (sample, condition name, segments)
            for sample in group:
                segs = session.segments(sample)
                reason = _too_long(engine, specs, segs)
                if reason is not None:
                    if on_too_long == "error":
                        raise _too_long_error(sample, reason)
                    skipped.append({"sample_id": sample.sample_id, "reason": reason})
                    continue
                work += [(sample, name, segs[name]) for name in specs]
            # A chunk is scored whole or not at all: a resumed run redoes a partly logged chunk with the same
            # batches as the uninterrupted run (smaller batches round differently in float32), and appends
            # only the missing lines.
            if all((sample.sample_id, name) in log.done for sample, name, _ in work):
                bar.update(len(group))
                continue
            done = engine.run_chunk([(specs[name], seg) for _, name, seg in work], per_token=per_token,
                                    encode_tokens=encode_tokens, score_tokens=score_tokens)
            costs = _chunk_costs(session, work, done, engine.last_chunk_s, shape)
            # metrics: [nll, answer]: the answer fields join the NLL's line, so a line is whole or absent on resume.
            extra = answer_fields(engine, work, done, max_new_tokens=cfg["answer"]["max_new_tokens"],
                                  batch_tokens=score_tokens) if "answer" in cfg["metrics"] else [{}] * len(work)
            for (sample, name, seg), (pc, score), spent, more in zip(work, done, costs, extra, strict=True):
                if (sample.sample_id, name) in log.done:
                    continue
                row = _row(sample, name, seg, pc, score, session.surrogates(sample, [name])[name], similarity,
                           save_tokens, per_token, spent)
                if by_passage:  # the cluster of the per-passage statistics (kvprime.analysis.passages)
                    row["passage_id"] = passage_id(sample)
                with interrupts.record_boundary():
                    log.append({**row, **more})
            engine.forget()
            bar.update(len(group))
        bar.close()
        n_rows, repaired = log.n_rows, log.repaired
    if not n_rows:
        raise RunError(f"no sample was scored: all {len(samples)} selected samples were skipped "
                       f"(first reason: {skipped[0]['reason'] if skipped else 'none'}). Use shorter passages "
                       "(dataset.filters.max_passage_words) or a model with a longer context.")
    return skipped, repaired
