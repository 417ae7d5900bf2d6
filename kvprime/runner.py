"""Run one experiment into one run directory: validate, load, score, summarise, report.

Everything that can be checked without weights (condition definitions, templates, names, RoPE support,
CUDA for 4-bit, the run directory's state) is checked first. Scores stream to ``scores.jsonl`` as they are
computed; a rerun with ``resume=true`` into the same directory scores only what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from . import hf_internals as hf
from . import metadata, models, report, stats, surrogates
from .builders import BUILDERS
from .conditions import ConditionSpec, validate
from .data import load_samples
from .results_io import ScoreLog, write_atomic, write_json, write_jsonl, read_jsonl, dumps
from .engine import Engine

# Keys that may differ between a run and its resumption.
_RESUME_FREE = ("resume", "progress")


class RunError(ValueError):
    """A configuration or run-directory problem, reported before any work is lost."""


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def plan_conditions(cfg: Mapping, only: str | None = None) -> dict[str, ConditionSpec]:
    """The run's conditions in order. ``only`` (``condition=<name>``) keeps that one and the baseline."""
    exp = cfg["experiment"]
    defined = dict(cfg.get("conditions") or {})
    baseline = exp["baseline"]
    if only is not None:
        chosen = dict(cfg.get("condition") or {})
        names = [baseline] if only == baseline else [baseline, only]
        defined = {**{baseline: defined.get(baseline)}, only: chosen or defined.get(only)}
    else:
        names = list(defined)
    if baseline not in defined or defined[baseline] is None:
        raise RunError(f"experiment {exp['name']!r} names baseline {baseline!r}, which is not among its conditions "
                       f"({', '.join(n for n in defined if defined[n] is not None)}).")
    specs = {}
    for name in names:
        spec = ConditionSpec.from_config(name, defined[name])
        validate(spec, BUILDERS)
        specs[name] = spec
    return specs


def _comparisons(exp: Mapping, defined: Mapping, specs: Mapping) -> list[dict]:
    """Named comparisons whose two conditions are in this run (``condition=<name>`` runs fewer)."""
    out = []
    for comp in exp.get("comparisons") or []:
        for key in ("treatment", "reference"):
            if comp[key] not in defined and comp[key] not in specs:
                raise RunError(f"experiment {exp['name']!r}: comparison {comp['name']!r} names {key} "
                               f"{comp[key]!r}, which is not one of its conditions ({', '.join(defined)}).")
        if comp["treatment"] in specs and comp["reference"] in specs:
            out.append({k: comp[k] for k in ("name", "treatment", "reference")})
    return out


def _check_resume(run_dir: Path, cfg: dict) -> None:
    stored_path = run_dir / "config.json"
    scores = run_dir / "scores.jsonl"
    if not cfg.get("resume"):
        if scores.exists() and scores.stat().st_size:
            raise RunError(f"{run_dir} already holds scores. Continue it with resume=true (same overrides), or "
                           "let kvprime make a new run directory.")
        return
    if not stored_path.exists():
        return
    stored = json.loads(stored_path.read_text())
    now = json.loads(dumps({k: v for k, v in cfg.items() if k not in _RESUME_FREE}))
    old = {k: v for k, v in stored.items() if k not in _RESUME_FREE}
    diff = sorted(k for k in set(now) | set(old) if now.get(k) != old.get(k))
    if diff:
        raise RunError(f"resume=true, but the configuration differs from the one {run_dir} was started with in "
                       f"{diff}. Resume with the original overrides (see {stored_path}), or start a new run.")


def run_experiment(cfg, run_dir, *, only: str | None = None, progress: bool | None = None) -> dict:
    """Run ``cfg`` (a Hydra/OmegaConf config or plain dict) into ``run_dir``; returns ``results.json``'s dict."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = _plain(cfg)
    run_dir = Path(run_dir)
    exp = cfg["experiment"]
    seed = int(cfg.get("seed", 0))
    progress = cfg.get("progress", True) if progress is None else progress

    specs = plan_conditions(cfg, only)
    baseline = exp["baseline"]
    comparisons = _comparisons(exp, cfg.get("conditions") or {}, specs)
    model_cfg = cfg["model"]
    mconf = models.model_config(model_cfg)
    for spec in specs.values():
        if spec.truncates_prefix:
            hf.check_config_supports(mconf, spec.rope_fix)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(run_dir, cfg)
    write_json(run_dir / "config.json", {k: v for k, v in cfg.items()})
    timings["validate"] = time.perf_counter() - t0

    t = time.perf_counter()
    loaded = load_samples({**cfg["dataset"]})
    samples = loaded.samples
    if not samples:
        raise RunError(f"dataset {cfg['dataset']['name']!r} gave no usable samples "
                       f"({len(loaded.rejected)} rejected; e.g. {loaded.rejected[:3]}).")
    pool = [s.query for s in samples]
    timings["load_data"] = time.perf_counter() - t

    t = time.perf_counter()
    model, tokenizer, model_info = models.load(model_cfg)
    engine = Engine(model, tokenizer, sink=model_cfg.get("sink", "bos"), max_context=model_cfg.get("max_context"))
    timings["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    resolved = {
        s.sample_id: {name: surrogates.resolve(spec.surrogate, s, pool=pool, seed=seed, tokenizer=tokenizer,
                                               n_tokens=spec.random_tokens) for name, spec in specs.items()}
        for s in samples
    }
    inputs = [{**s.to_dict(), "surrogates": resolved[s.sample_id]} for s in samples]
    inputs_path = run_dir / "inputs.jsonl"
    if inputs_path.exists() and cfg.get("resume"):
        if read_jsonl(inputs_path) != [json.loads(dumps(r)) for r in inputs]:
            raise RunError(f"resume=true, but the samples now selected differ from {inputs_path}. The data or the "
                           "loader changed; start a new run.")
    write_jsonl(inputs_path, inputs)

    skipped, on_too_long = [], cfg.get("on_too_long", "skip")
    save_tokens, per_token = bool(cfg.get("save_tokens")), bool(cfg.get("per_token"))
    from tqdm.auto import tqdm

    with ScoreLog(run_dir / "scores.jsonl") as log:
        bar = tqdm(samples, desc=f"{exp['name']} ({len(specs)} conditions)", unit="sample", disable=not progress)
        for sample in bar:
            segs = {name: engine.segments(spec, document=sample.passage, query=sample.query, answer=sample.answer,
                                          surrogate=resolved[sample.sample_id][name]) for name, spec in specs.items()}
            too_long = [n for n, spec in specs.items() if not engine.fits(segs[n], spec)]
            if too_long:
                need = max(len(segs[n]) + specs[n].position_offset for n in too_long)
                limit = engine.max_context if not engine.windows else min(engine.max_context or 1 << 30,
                                                                          min(engine.windows))
                reason = f"needs {need} tokens in condition {too_long[0]!r}; the model's limit is {limit}"
                if on_too_long == "error":
                    raise RunError(f"sample {sample.sample_id!r} {reason} (on_too_long=error; use on_too_long=skip "
                                   "to skip and count such samples).")
                skipped.append({"sample_id": sample.sample_id, "reason": reason})
                continue
            for name, spec in specs.items():
                if (sample.sample_id, name) in log.done:
                    continue
                seg = segs[name]
                primed = engine.build(spec, seg)
                score = engine.score(primed, seg, per_token=per_token)
                row = {"sample_id": sample.sample_id, "condition": name, "nll": score.nll, "nll_sum": score.nll_sum,
                       "n_answer_tokens": score.n_answer_tokens, "cache_len": len(primed),
                       "next_position": primed.next_position, "encoded_tokens": primed.encoded_tokens,
                       "surrogate": resolved[sample.sample_id][name]}
                if not score.finite:
                    row["nonfinite"] = repr(score.nll)
                if save_tokens:
                    row.update(cache_token_ids=primed.token_ids, cache_position_ids=primed.position_ids,
                               prompt_token_ids=list(seg.prompt), answer_token_ids=list(seg.answer),
                               kept_segments=list(primed.kept_segments),
                               segment_token_ids={k: list(getattr(seg, k)) for k in
                                                  ("sink", "prefix", "document", "suffix")})
                if per_token:
                    row["token_logprobs"] = score.token_logprobs
                log.append(row)
            engine.forget()
        rows = list(log.rows)
        repaired = log.repaired
    if not rows:
        raise RunError(f"no sample was scored: all {len(samples)} selected samples were skipped "
                       f"(first reason: {skipped[0]['reason'] if skipped else 'none'}). Use shorter passages "
                       "(dataset.filters.max_passage_words) or a model with a longer context.")
    timings["score"] = time.perf_counter() - t

    t = time.perf_counter()
    order = {s.sample_id: i for i, s in enumerate(samples)}
    names = list(specs)
    rows.sort(key=lambda r: (order.get(r["sample_id"], 1 << 30), names.index(r["condition"])))
    scores = pd.DataFrame(rows)
    scores["nll"] = scores["nll"].astype(float)  # nulls (non-finite) become NaN, flagged by stats
    st_cfg = dict(cfg.get("stats") or {})
    summary, comp = stats.summarize(scores, baseline=baseline, conditions=names, comparisons=comparisons,
                                    n_boot=int(st_cfg.get("n_boot", 10000)), seed=seed,
                                    alpha=float(st_cfg.get("alpha", 0.05)),
                                    confidence=float(st_cfg.get("confidence", 0.95)))
    diagnosis = report.diagnose(comp, exp.get("diagnosis") or [], alpha=float(st_cfg.get("alpha", 0.05))) \
        if len(comp) else []
    timings["stats"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    flat_cols = [c for c in scores.columns if not isinstance(scores[c].iloc[0], (list, dict))]
    write_atomic(run_dir / "scores.csv", scores[flat_cols].to_csv(index=False))
    write_atomic(run_dir / "summary.csv", summary.to_csv(index=False))
    write_atomic(run_dir / "comparisons.csv", comp.to_csv(index=False))
    scored = scores["sample_id"].nunique()
    results = {
        "experiment": {k: exp.get(k) for k in ("name", "title", "description", "baseline")},
        "conditions": {n: s.to_dict() for n, s in specs.items()},
        "counts": {"selected_samples": len(samples), "scored_samples": int(scored), "skipped_samples": len(skipped),
                   "rejected_records": len(loaded.rejected), "candidates": loaded.n_candidates,
                   "score_lines": len(rows), "nonfinite_scores": int(scores["nll"].isna().sum()),
                   "log_lines_repaired_on_resume": repaired},
        "summary": summary.to_dict(orient="records"),
        "comparisons": comp.to_dict(orient="records"),
        "diagnosis": diagnosis,
        "notes": _notes(specs, tokenizer, model_cfg, scores),
        "skipped": skipped,
        "rejected": [r.__dict__ if hasattr(r, "__dict__") else dict(r) for r in loaded.rejected],
        "metadata": {
            "versions": metadata.versions(), "git": metadata.git_state(), "seed": seed,
            "environment": metadata.environment(engine.device),
            "model": {"name": model_cfg.get("name"), "dtype": model_cfg.get("dtype"), "sink": engine.sink_policy,
                      "sink_token_ids": engine.sink, "quantization": model_cfg.get("quantization"),
                      "max_context": engine.max_context, "sliding_windows": sorted(set(engine.windows)),
                      **model_info},
            "dataset": {"name": cfg["dataset"].get("name"), "n_samples": cfg["dataset"].get("n_samples"),
                        "selection": cfg["dataset"].get("selection"), "selection_seed": cfg["dataset"].get("seed"),
                        "sample_ids_sha256": metadata.sample_ids_sha256([s.sample_id for s in samples])},
            "model_encodes": engine.n_encodes, "encoded_tokens": engine.n_encoded_tokens,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "run_dir": str(run_dir.resolve()),
        },
    }
    write_json(run_dir / "results.json", results)
    write_atomic(run_dir / "report.md", report.render(results, summary, comp))
    return results


def _notes(specs, tokenizer, model_cfg, scores) -> list[str]:
    notes = []
    if model_cfg.get("sink") == "bos":
        added = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        notes.append(f"Sink policy 'bos': every cache starts with the BOS token {tokenizer.bos_token!r}"
                     + ("" if added else " (this tokenizer does not add it by itself; kvprime inserts it, as the "
                                         "notebooks' caches all start with BOS)") + ".")
    if any(s.builder == "truncate_suffix" for s in specs.values()):
        notes.append("Suffix-truncated conditions keep exactly the entries of the bare cache (under causal attention "
                     "the document never sees the suffix); any difference from the bare condition is float rounding.")
    if any(s.truncates_prefix and s.rope_fix == "none" for s in specs.values()):
        notes.append("rope_fix=none reproduces the notebooks' uncorrected truncation: the document keys stay rotated "
                     "for positions S tokens too far, and scoring continues at the cache's end.")
    bad = scores[scores["nll"].isna()]
    if len(bad):
        notes.append(f"{len(bad)} score(s) were non-finite and are excluded from every average: "
                     + ", ".join(f"{r.sample_id}/{r.condition}" for r in bad.itertuples()))
    return notes
