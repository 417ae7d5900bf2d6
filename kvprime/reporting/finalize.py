"""Everything after scoring, from the run directory's files alone: derived (routed) conditions, statistics,
the experiment's analyses, figures, ``results.json`` and ``report.md``.

``kvprime report <run_dir>`` calls this on a finished run (a killed one: resume it first); given the same
files it writes the same tables byte for byte.

``results.json`` is the directory's completion record: finalize writes it last, so a directory that holds it has
every table and report of its scores (a sweep report counts such a job as complete). Once it is written, an
``error.json`` of an earlier failure no longer describes the directory and is removed.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import cost, routing, stats
from ..analysis.registry import AnalysisInput, run_analyses, validate_analyses
from ..builders.conditions import ConditionSpec, builder_notes
from ..config import plugins, settings
from ..config.comparisons import comparisons_for
from ..errors import ConfigError, DataError, KvprimeError, MissingFileError
from ..files.results_io import JsonlRecords, iter_jsonl, write_atomic, write_json
from ..surrogates import quality
from . import answer_report, html, report

FLAT_SCORE_COLUMNS = ("sample_id", "condition", "nll", "nll_sum", "n_answer_tokens", "cache_len", "next_position",
                      "encoded_tokens", "surrogate", "similarity", "nonfinite", "passage_id", "generated_answer",
                      "exact_match", "f1", "contains", "generated_answer_tokens", "answer_stop")


COMPLETION_RECORD = "results.json"
# scores.jsonl lines parsed into Python objects at once while the frame is built (memory, not output).
_LINES_PER_FRAME = 2048
# What an analysis sees of each score line (AnalysisInput.scores); the answer fields when metrics include answer.
ANALYSIS_SCORE_COLUMNS = ("sample_id", "condition", "nll", "similarity", "passage_id", "exact_match", "f1", "contains")


def _load(run_dir: Path, name: str):
    path = run_dir / name
    if not path.exists():
        if (run_dir / ".hydra" / "overrides.yaml").is_file():
            fix = f"a run writes it when scoring ends; `kvprime resume {run_dir}` finishes it"
        else:  # no record of a `kvprime run` command: nothing for `kvprime resume` to repeat
            fix = ("the directory has no record of a `kvprime run` command, so `kvprime resume` cannot finish it; "
                   "if it is a merge's output, the same `kvprime merge` command with --overwrite redoes it")
        raise MissingFileError(f"{run_dir} is not a finished kvprime run directory: {name} is missing ({fix}).")
    return json.loads(path.read_text())


def finalize(run_dir) -> dict:
    run_dir = Path(run_dir)
    cfg, plan, meta = _load(run_dir, "config.json"), _load(run_dir, "plan.json"), _load(run_dir, "metadata.json")
    # Only what this step uses is checked: the run's model device belongs to the machine that scored it. An older
    # run's config.json may lack newer settings; they get their declared defaults.
    cfg = settings.check(cfg, only=("seed", "stats", "metrics", "answer"), origin=str(run_dir / "config.json"))
    exp, seed, st = cfg["experiment"], cfg["seed"], cfg["stats"]
    # `kvprime report` runs in a fresh process: the run's plugins register their analyses as they import.
    plugins.load(cfg.get("plugins") or (), recorded=plan.get("plugins"))
    analysis_names = validate_analyses(exp.get("analyses"))
    names = list(plan["conditions"])
    inputs = JsonlRecords(run_dir / "inputs.jsonl")  # read on each pass: never all in memory at once
    scores, n_lines = _scores_frame(run_dir, inputs, names)
    scores["nll"] = scores["nll"].astype(float)  # nulls (non-finite) become NaN, flagged by stats
    if "similarity" not in scores:
        scores["similarity"] = float("nan")

    rules = [dict(r) for r in exp.get("derived") or []]
    rules = [r for r in rules if all(c in names for c in r.get("among", []))]  # condition=<x> runs a subset
    routing.validate(rules, names)
    derived = routing.derive(scores, rules, seed=seed)
    all_scores = pd.concat([scores[["sample_id", "condition", "nll"]], derived[["sample_id", "condition", "nll"]]],
                           ignore_index=True) if len(derived) else scores[["sample_id", "condition", "nll"]]
    all_names = names + [r["name"] for r in rules]
    defined = {**(cfg.get("conditions") or {}), **{r["name"]: r for r in exp.get("derived") or []}}
    comparisons = comparisons_for(exp, defined, all_names)

    floor = meta.get("numerical_floor")
    tie, tie_source = stats.tie_tolerance(st["tie_tolerance"], (cfg.get("model") or {}).get("dtype"), floor)
    statistics = {k: st[k] for k in ("alpha", "confidence", "n_boot", "equivalence_margin", "power")} | {
        "tie_tolerance": tie, "tie_tolerance_source": tie_source}
    summary, comp = stats.summarize(all_scores, baseline=exp["baseline"], conditions=all_names,
                                    comparisons=comparisons, n_boot=st["n_boot"], seed=seed, alpha=st["alpha"],
                                    confidence=st["confidence"], tie_tolerance=tie,
                                    equivalence_margin=st["equivalence_margin"], power=st["power"])
    # Cost beside benefit: every test's treatment against its reference, per document (kvprime.analysis.cost).
    costs = cost.add_derived(cost.per_score_costs(scores, meta.get("model_shape"), meta.get("generator_shape")), rules)
    cost_tab = cost.cost_table(costs, cost.tests_frame(summary, comp, exp["baseline"]))
    vs_base = cost_tab.iloc[:int((~summary["is_baseline"].astype(bool)).sum())].set_index("treatment")
    for col in ("index_gflop", "extra_index_gflop", "delta_per_index_tflop", "query_gflop"):
        summary[col] = summary["condition"].map(vs_base[col])
    base_cost = costs[costs.condition == exp["baseline"]][["index_gflop", "query_gflop"]].mean()
    summary.loc[summary["is_baseline"].astype(bool), ["index_gflop", "query_gflop"]] = base_cost.to_numpy()
    diagnosis = report.diagnose(comp, exp.get("diagnosis") or [], alpha=st["alpha"]) if len(comp) else []

    answer_part = None
    if "answer" in cfg["metrics"]:  # EM and F1 beside NLL (kvprime.reporting.answer_report)
        summary, comp, answer_part = answer_report.add(scores, derived, summary, comp, baseline=exp["baseline"],
                                                       conditions=all_names, named=comparisons, cfg=cfg,
                                                       run_dir=run_dir)

    similarity = _primary_similarity(scores, exp)
    # Copies: an analysis that changes its inputs must not change what finalize writes after it.
    ran = run_analyses(analysis_names, AnalysisInput(
        scores=scores[[c for c in ANALYSIS_SCORE_COLUMNS if c in scores]].copy(), inputs=inputs,
        similarity=None if similarity is None else similarity.copy(), baseline=exp["baseline"], seed=seed,
        n_boot=st["n_boot"], alpha=st["alpha"], confidence=st["confidence"], experiment=copy.deepcopy(exp),
        derived=derived.copy(), tie_tolerance=tie, equivalence_margin=st["equivalence_margin"], power=st["power"]))
    analyses, titles = dict(ran.tables), dict(ran.titles)
    if len(derived):  # the routers' choices belong to the derived conditions, whatever analyses are named
        if routing.CHOICES_TABLE in analyses:
            raise ConfigError(f"experiment.analyses: an analysis writes the table {routing.CHOICES_TABLE!r}, which "
                              "the derived conditions write; rename the analysis's table.")
        analyses[routing.CHOICES_TABLE] = routing.routing_table(derived)
        titles[routing.CHOICES_TABLE] = routing.CHOICES_TITLE

    figures = {}
    try:
        from .figures import conditions_figure, save_figure  # lazy: matplotlib, optional (no figures without it)

        figures["conditions"] = conditions_figure(summary, run_dir / "conditions.png",
                                                  title=f"{exp['name']}: mean NLL and delta vs {exp['baseline']}",
                                                  margin=st["equivalence_margin"]).name
        if answer_part is not None:
            figures["answer_quality"] = answer_report.figure(
                summary, run_dir / answer_report.FIGURE,
                title=f"{exp['name']}: NLL delta against F1 delta vs {exp['baseline']}").name
        for key, fig in ran.figures.items():
            figures[key] = save_figure(fig.draw(), run_dir / fig.file).name
    except ImportError:  # figures are optional output; tables are not
        pass

    cols = [c for c in FLAT_SCORE_COLUMNS if c in scores.columns]
    write_atomic(run_dir / "scores.csv", scores[cols].to_csv(index=False))
    if len(derived):
        write_atomic(run_dir / "routed_scores.csv", derived.to_csv(index=False))
    write_atomic(run_dir / "summary.csv", summary.to_csv(index=False))
    write_atomic(run_dir / "comparisons.csv", comp.to_csv(index=False))
    write_atomic(run_dir / "costs.csv", cost_tab.to_csv(index=False))
    # Are the generated surrogates queries at all (kvprime.surrogates.quality)? Only for runs that generate.
    gen_quality, gen_warnings = _generated_quality(inputs, plan["conditions"])
    if len(gen_quality):
        write_atomic(run_dir / "generated_surrogates.csv", gen_quality.to_csv(index=False))
    for name, table in analyses.items():
        write_atomic(run_dir / "analyses" / f"{name}.csv", table.to_csv(index=False))
    inspect = json.loads((run_dir / "inspect.json").read_text()) if (run_dir / "inspect.json").exists() else None

    results = {
        "experiment": {k: exp.get(k) for k in ("name", "title", "description", "baseline")},
        "statistics": statistics,
        "numerical_floor": floor,
        "conditions": plan["conditions"],
        "derived": rules,
        "counts": {"selected_samples": len(inputs), "scored_samples": int(scores["sample_id"].nunique()),
                   "skipped_samples": len(meta.get("skipped", [])),
                   "rejected_records": len(meta["dataset"].get("rejected", [])),
                   "candidates": meta["dataset"].get("candidates"), "score_lines": n_lines,
                   "nonfinite_scores": int(scores["nll"].isna().sum()),
                   "log_lines_repaired_on_resume": meta.get("log_lines_repaired_on_resume", 0)},
        "summary": summary.to_dict(orient="records"),
        "comparisons": comp.to_dict(orient="records"),
        "diagnosis": diagnosis,
        "answer_quality": answer_part,
        "costs": cost_tab.to_dict(orient="records"),
        "worth_it": cost.worth_it(cost_tab, named=len(comp)),
        "generated_surrogates": {"table": gen_quality.to_dict(orient="records"), "generator": meta.get("generation"),
                                 "warnings": gen_warnings} if len(gen_quality) else None,
        "analyses": {k: v.to_dict(orient="records") for k, v in analyses.items()},
        "figures": figures,
        "notes": _notes(plan["conditions"], _builder_notes(plan), meta, scores),
        "skipped": meta.get("skipped", []),
        "rejected": meta["dataset"].get("rejected", []),
        "metadata": meta,
    }
    write_atomic(run_dir / "report.md", report.render(results, summary, comp, analyses=analyses, titles=titles,
                                                             inspect=inspect))
    write_atomic(run_dir / html.PAGE, html.render_pieces(run_dir, results, summary, comp, inputs=inputs,
                                                         scores=scores, derived=derived, analyses=analyses,
                                                         titles=titles, inspect=inspect))
    write_json(run_dir / COMPLETION_RECORD, results)  # last: its presence means every file above is written
    (run_dir / "error.json").unlink(missing_ok=True)  # an earlier failure's record; this finalize got past it
    return results


def _scores_frame(run_dir: Path, inputs, names: list[str]) -> tuple[pd.DataFrame, int]:
    """scores.jsonl as a frame in run order (the inputs' order, then the plan's conditions), and its line count.
    The lines are read one at a time into columns (a missing key is NaN, as pandas makes it from records), a
    chunk of lines at a time, so the scores are held once, as frame columns, never as a list of parsed lines."""
    order = {r["sample_id"]: i for i, r in enumerate(inputs)}
    rank = {name: i for i, name in enumerate(names)}
    frames: list[pd.DataFrame] = []
    order_of, rank_of = [], []  # per kept line: its sample's place in the run, its condition's in the plan
    unplanned: set[str] = set()
    lines = iter_jsonl(run_dir / "scores.jsonl")
    while chunk := list(itertools.islice(lines, _LINES_PER_FRAME)):
        columns: dict[str, list] = {}
        n = 0
        for row in chunk:
            if row["condition"] not in rank:
                unplanned.add(row["condition"])
                continue
            for key, value in row.items():
                if key not in columns:
                    columns[key] = [np.nan] * n
                columns[key].append(value)
            n += 1
            for values in columns.values():
                if len(values) == n - 1:
                    values.append(np.nan)
            order_of.append(order.get(row["sample_id"], 1 << 30))
            rank_of.append(rank[row["condition"]])
        del chunk
        if n:
            frames.append(pd.DataFrame(columns))
    if unplanned:
        raise DataError(f"{run_dir / 'scores.jsonl'} holds scores of condition(s) "
                        f"{', '.join(map(repr, sorted(unplanned)))}, "
                        f"which plan.json does not plan (it plans {', '.join(names)}): the files are not of one run.")
    scores = _joined(frames)
    # Stable (lexsort is): lines of one (sample, condition) keep their file order.
    perm = np.lexsort((np.asarray(rank_of, dtype=np.int64), np.asarray(order_of, dtype=np.int64)))
    if not np.array_equal(perm, np.arange(len(perm))):
        scores = scores.take(perm).reset_index(drop=True)
    return scores, len(perm)


def _joined(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The chunks' frames as the one frame pandas would make of all their rows at once: a column whose chunks
    pandas typed differently (all missing in one, numbers in another) is typed again from all its values."""
    if len(frames) <= 1:
        return frames[0] if frames else pd.DataFrame()
    joined = pd.concat(frames, ignore_index=True)
    for col in joined.columns:
        if len({str(f[col].dtype) if col in f else None for f in frames}) > 1:
            joined[col] = pd.Series(joined[col].tolist())
    return joined


def _generated_quality(inputs, conditions: dict) -> tuple[pd.DataFrame, list[str]]:
    """The quality table with one row per surrogate source (conditions sharing a source share its texts), named
    after the source and listing its conditions, and its warnings."""
    by_source: dict[str, list[str]] = {}
    for name, c in conditions.items():
        by_source.setdefault(str(c.get("surrogate")), []).append(name)
    first = {names[0]: conditions[names[0]] for names in by_source.values()}
    table = quality.quality_table(quality.rows_from_run(inputs, first))
    if not len(table):
        return table, []
    sources = [str(conditions[c].get("surrogate")) for c in table["condition"]]
    table["condition"] = sources
    warnings = quality.degenerate_warnings(table)
    table = table.rename(columns={"condition": "source"})
    table.insert(1, "conditions", [", ".join(by_source[s]) for s in sources])
    return table, warnings


def _primary_similarity(scores: pd.DataFrame, exp) -> pd.Series | None:
    """Per-sample similarity of the experiment's main surrogate (``experiment.similarity_condition``)."""
    cond = exp.get("similarity_condition")
    if not cond or scores["similarity"].isna().all():
        return None
    part = scores[scores.condition == cond].set_index("sample_id")["similarity"].astype(float)
    return part if part.notna().any() else None


def _builder_notes(plan: dict) -> list[str]:
    """The builders' sentences the run recorded; a run recorded before builders stored them gets them from the
    registry now (kvprime's builders import no torch until they build)."""
    if "builder_notes" in plan:
        return plan["builder_notes"]
    try:
        return builder_notes({n: ConditionSpec.from_config(n, c) for n, c in plan["conditions"].items()})
    except KvprimeError:  # a builder this process does not have: the report goes on without its note
        return []


def _notes(conditions: dict, builder_notes: list[str], meta: dict, scores: pd.DataFrame) -> list[str]:
    notes = []
    model = meta["model"]
    if model.get("sink") == "bos":
        notes.append(f"Sink policy 'bos': every cache starts with the BOS token (id {model.get('sink_token_ids')})"
                     + ("" if model.get("bos_added_by_tokenizer") else
                        "; this tokenizer does not add it by itself, so kvprime inserts it, as the notebooks' caches "
                        "all start with BOS") + ".")
    notes += builder_notes  # each builder's own sentence, recorded in plan.json when the run started
    if any(c.get("position_offset") for c in conditions.values()):
        notes.append("A condition encoded at a position offset differs from its offset-0 twin only by float rounding "
                     "(RoPE attention depends on relative positions): it is the numerical-noise control.")
    bad = scores[scores["nll"].isna()]
    if len(bad):
        notes.append(f"{len(bad)} score(s) were non-finite and are excluded from every average: "
                     + ", ".join(f"{r.sample_id}/{r.condition}" for r in bad.itertuples()))
    return notes
