"""``report.md`` of a run from its results: conditions, statistics, analyses, diagnosis, notes, definitions.

Every table goes through ``kvprime.reporting.tables.markdown_table``; the analyses' headings come from the analyses
themselves (``kvprime.analysis.registry``), so nothing here knows an experiment by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import pandas as pd

from .answer_report import section
from .tables import cell, markdown_table

DEFINITIONS = """\
- **NLL**: mean natural-log negative log-likelihood of the answer tokens given the cache and the prompt
  (lower is better); `nll_sum` and `n_answer_tokens` are in `scores.csv`.
- **delta** = reference NLL - condition NLL, per sample, paired by `sample_id` (positive: the condition
  is better). Against the baseline, the reference is the baseline.
- **win / tie / loss**: delta > tie tolerance / |delta| <= tie tolerance / delta < -tie tolerance, per
  sample. The tie tolerance is the numerical floor (stated under Statistics): a difference that float rounding
  alone produces is not an effect.
- **d_z**: mean(delta) / std(delta, ddof=1) (Cohen's d for paired samples). std uses ddof=1 everywhere.
- **CI**: seeded bootstrap (scipy, BCa; percentile where BCa is degenerate) of mean delta.
- **p**: paired t-test (`p_ttest`), Wilcoxon signed-rank (`p_wilcoxon`, ties discarded) and exact sign test
  of wins against losses (`p_sign`).
- **TOST** (`p_tost`): two one-sided paired t-tests (statsmodels `ttost_paired`) of
  -margin < mean delta < +margin, the equivalence margin in nats of mean NLL (`stats.equivalence_margin`).
- **Holm**: every test of this run (each condition vs baseline and each named comparison), its t-test p and
  its TOST p, is one family: `p_holm` and `p_tost_holm` are adjusted together.
- **verdict**: *equivalent* when p_tost_holm < alpha (the effect is shown to be smaller than the margin);
  else *better*/*worse* when p_holm < alpha; else *inconclusive* (this run can show neither a difference nor
  its absence: a "no effect" claim needs *equivalent*).
- **MDE** (`mde`): the smallest |mean delta| the paired t-test detects with the stated power at this n and
  the unadjusted alpha, from the observed sd of the deltas (statsmodels `TTestPower`). `kvprime power <run>
  --effect E` gives the n needed for an effect E, and for equivalence within the margin.
- **Cost** (`costs.csv`): model FLOPs from the model's shapes (projections, gated MLP, attention, LM head).
  Indexing, per document: the cache's encoded tokens through the model, plus a generated surrogate's prompt
  prefill and one forward per generated token (on the generator). Query time: prompt and answer tokens against
  the cache. A routed condition pays for every cache it routes among. Seconds are each chunk's measured wall
  time shared in proportion to FLOPs.
- Non-finite NLLs are flagged (`n_nonfinite`) and never averaged."""


def diagnose(comparisons: pd.DataFrame, rules: Sequence[Mapping], alpha: float = 0.05) -> list[dict]:
    """The notebook's diagnosis rules: compare the paired mean delta with a threshold, and say next to
    each call whether the difference is statistically significant, since a threshold alone is not."""
    out = []
    for rule in rules:
        row = comparisons[(comparisons.treatment == rule["treatment"]) & (comparisons.reference == rule["reference"])]
        if row.empty:
            continue
        row = row.iloc[0]
        delta, threshold = float(row.mean_delta), float(rule["threshold"])
        if delta > threshold:
            status, text = "OK", rule["ok"]
        elif delta < -threshold:
            status, text = "PROBLEM", rule["problem"]
        else:
            status, text = "UNCLEAR", rule["unclear"]
        significant = bool(row.p_holm < alpha) if not math.isnan(row.p_holm) else False
        if status != "UNCLEAR" and not significant:
            text += " But the difference is not statistically significant, so the data do not support this call."
        out.append({
            "check": rule["name"], "status": status, "text": text, "mean_delta": delta,
            "threshold": threshold, "p_holm": float(row.p_holm), "significant": significant,
            "ci": [float(row.ci_low), float(row.ci_high)],
            # The four-way verdict (TOST + difference test) beside the notebook's threshold call.
            "verdict": str(row.get("verdict", "")) or None,
            "p_tost_holm": float(row.get("p_tost_holm", float("nan"))),
        })
    return out


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.4f}"


def diagnosis_text(items: Sequence[Mapping]) -> str:
    lines = []
    for d in items:
        sig = "significant" if d["significant"] else "not significant"
        verdict = f" Verdict: **{d['verdict']}** (p_tost_holm {cell(d['p_tost_holm']) or 'n/a'})." \
            if d.get("verdict") else ""
        lines.append(
            f"- **[{d['status']}] {d['check']}**: {d['text']} (mean delta {d['mean_delta']:+.4f} vs threshold "
            f"±{d['threshold']:g}; 95% CI [{_signed(d['ci'][0])}, {_signed(d['ci'][1])}]; "
            f"p_holm {cell(d['p_holm']) or 'n/a'}, {sig}).{verdict}"
        )
    return "\n".join(lines)


def rejection_counts(rejected: Sequence[Mapping]) -> list[tuple[str, int]]:
    """Reasons with their numbers masked ("passage has N words (> max_passage_words=150)"), most common first."""
    counts: dict[str, int] = {}
    for r in rejected:
        reason = re.sub(r"\b\d+ words", "N words", r["reason"])
        counts[reason] = counts.get(reason, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


SUMMARY_COLUMNS = ("condition", "n", "n_nonfinite", "mean", "std", "sem", "mean_delta", "ci_low", "ci_high",
                   "win_rate", "tie_rate", "p_ttest", "p_wilcoxon", "p_holm", "p_tost_holm", "d_z", "mde", "verdict")
COMPARISON_COLUMNS = ("name", "treatment", "reference", "n", "mean_delta", "ci_low", "ci_high", "win_rate",
                      "tie_rate", "p_ttest", "p_wilcoxon", "p_holm", "p_tost_holm", "d_z", "mde", "verdict")


COST_COLUMNS = ("test", "mean_delta", "ci_low", "ci_high", "verdict", "index_tokens", "generated_tokens",
                "index_gflop", "extra_index_gflop", "extra_index_s", "query_tokens", "query_gflop",
                "extra_query_gflop", "extra_query_s", "recompute_tokens", "delta_per_index_tflop")


def inspect_text(inspect: Mapping) -> str:
    conds = inspect["conditions"]
    shapes = markdown_table(
        [[name, c["cache_len"], ", ".join(c["kept_segments"]), len(c["segments"]["sink"]),
          len(c["segments"]["prefix"]), len(c["segments"]["document"]),
          f"{c['cache_position_ids'][0]}..{c['cache_position_ids'][-1]}", c["next_position"]]
         for name, c in conds.items()],
        ["condition", "cache length", "kept segments", "sink", "prefix (cut or kept)", "document", "positions",
         "scoring from"])
    layers = markdown_table(
        [[r["layer"], r["keys_cos"], r["keys_max_abs_diff"], r["values_cos"], r["values_max_abs_diff"]]
         for r in inspect["layers"]],
        ["layer", "keys cos", "keys max abs diff", "values cos", "values max abs diff"],
        formats={"keys cos": ".6f", "keys max abs diff": ".3e", "values cos": ".6f", "values max abs diff": ".3e"})
    lens = {c["cache_len"] for c in conds.values()}
    return "\n".join([
        f"Sample `{inspect['sample_id']}`.", "", shapes, "",
        f"Cache lengths {'match' if len(lens) == 1 else 'DIFFER'}; document token ids "
        f"{'identical' if inspect['same_document_ids'] else 'DIFFER'} across the two conditions.", "",
        "Per-layer similarity of the document's entries (cosine over all heads and positions; max |diff|):", "",
        layers])


def statistics_text(st: Mapping | None, floor: Mapping | None) -> str:
    """The header's statistics line: the settings every verdict in the report depends on, and the floor."""
    if not st:
        return ""
    text = (f"Statistics: alpha {st['alpha']:g} on Holm-adjusted p, equivalence margin ±{st['equivalence_margin']:g} "
            f"nats (TOST), tie tolerance {st['tie_tolerance']:g} nats ({st['tie_tolerance_source']}), MDE at power "
            f"{st['power']:g}, {st['n_boot']} bootstrap resamples.")
    if floor and floor.get("measured"):
        text += (f" Numerical floor ({floor.get('dtype')}, {floor.get('device')}): re-rotated vs exact keys differ "
                 f"by at most {floor['max_key_abs_diff']:.2e}, NLL by {floor['max_nll_abs_diff']:.2e} nats "
                 f"(accepted up to {floor.get('tolerance', float('nan')):.0e}).")
    elif floor:
        text += f" Numerical floor not measured: {floor.get('reason', 'no re-rotated condition')}."
    return text


def render(results: Mapping, summary: pd.DataFrame, comparisons: pd.DataFrame, *,
           analyses: Mapping[str, pd.DataFrame] | None = None, titles: Mapping[str, str] | None = None,
           inspect: Mapping | None = None) -> str:
    """``analyses``: table name -> table, in report order; ``titles``: table name -> heading (default: the
    name), as the analyses gave them."""
    exp, meta = results["experiment"], results["metadata"]
    conds = results["conditions"]
    parts = [
        f"# {exp['name']}: {exp.get('title', '')}".rstrip(": "),
        exp.get("description", "").strip(),
        f"Model **{meta['model']['name']}** ({meta['model'].get('dtype')}, {meta['environment']['device']}), "
        f"dataset **{meta['dataset']['name']}**: {results['counts']['scored_samples']} samples scored "
        f"({results['counts']['skipped_samples']} skipped as too long, {results['counts']['rejected_records']} "
        f"records rejected at load). Baseline: `{exp['baseline']}`. Sink policy: `{meta['model']['sink']}`.",
        statistics_text(results.get("statistics"), results.get("numerical_floor")),
        "## Conditions",
        markdown_table([{"condition": n, **c} for n, c in conds.items()],
                       ("condition", "builder", "surrogate", "rope_fix", "position_offset", "description")),
        "## Results against the baseline",
        "Sorted as run; delta > 0 means the condition has lower NLL than the baseline.",
        markdown_table(summary, SUMMARY_COLUMNS),
    ]
    if len(comparisons):
        parts += ["## Named comparisons", "delta = reference NLL - treatment NLL (positive: treatment better).",
                  markdown_table(comparisons, COMPARISON_COLUMNS)]
    if results.get("answer_quality"):
        parts += section(results["answer_quality"])
    if results.get("costs"):
        costs = pd.DataFrame(results["costs"])
        # Runs that decoded answers also show what decoding them cost (tokens and GFLOPs per document).
        decoded = "answer_gflop" in costs and costs["answer_gflop"].notna().any()
        answer_cols = ("answer_tokens", "answer_gflop") if decoded else ()
        parts += ["## Cost beside benefit",
                  "Per document, the treatment's indexing work (its cache's encoded tokens, plus a generated "
                  "surrogate's generation) and query-time work"
                  + (" (scoring, and `answer_gflop`: decoding the answer)" if decoded else "")
                  + ", next to its benefit over the reference; "
                  "`delta_per_index_tflop` = mean delta per TFLOP of extra indexing. Seconds: this run's device.",
                  markdown_table(costs, COST_COLUMNS + answer_cols,
                                 formats={"index_tokens": ".0f", "generated_tokens": ".0f", "query_tokens": ".0f",
                                          "index_gflop": ".3f", "extra_index_gflop": ".3f", "extra_index_s": ".3f",
                                          "query_gflop": ".3f", "delta_per_index_tflop": ".3g",
                                          "extra_query_gflop": ".3f", "extra_query_s": ".3f",
                                          "recompute_tokens": ".1f",
                                          "answer_tokens": ".1f", "answer_gflop": ".3f"})]
        if results.get("worth_it"):
            parts += ["Is document-specific generation worth its compute?\n\n"
                      + "\n".join(f"- {line}" for line in results["worth_it"])]
    gen = results.get("generated_surrogates")
    if gen:
        who = (gen.get("generator") or {})
        parts += ["## Generated surrogates: are they queries?",
                  f"Generator: `{who.get('model_id') or who.get('name') or 'the scored model'}`. "
                  "Copied: a verbatim run "
                  "of >= 8 document words (or >= 5 making up >= 60% of the surrogate); identical: the same text as "
                  "another template's for the same document; question: ends in '?' or opens with a question word.",
                  markdown_table(pd.DataFrame(gen["table"]))]
        if gen.get("warnings"):
            parts += ["**Warning: degenerate surrogates.**\n\n" + "\n".join(f"- {w}" for w in gen["warnings"])]
    for key, fname in (results.get("figures") or {}).items():
        parts += [f"![{key}]({fname})"]
    for name, table in (analyses or {}).items():
        parts += [f"## {(titles or {}).get(name, name)}",
                  markdown_table(table, list(table.columns)) if len(table) else "_(no data: conditions missing)_"]
    if results.get("diagnosis"):
        parts += ["## Diagnosis", "The notebook's view (thresholds on the mean delta: OK / PROBLEM / UNCLEAR), "
                  "with the statistics and this run's verdict beside each call; only *equivalent* supports a "
                  "\"no effect\" reading.", diagnosis_text(results["diagnosis"])]
    if inspect:
        parts += ["## Cache check (kvprime inspect)", inspect_text(inspect)]
    notes = [n for n in results.get("notes", []) if n]
    if notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    if results.get("skipped"):
        parts += ["## Skipped samples", "\n".join(f"- `{s['sample_id']}`: {s['reason']}" for s in results["skipped"])]
    if results.get("rejected"):
        parts += ["## Records rejected at load", "Counted by reason (every record is listed in `results.json`).",
                  "\n".join(f"- {n} × {reason}" for reason, n in rejection_counts(results["rejected"]))]
    parts += ["## Definitions", DEFINITIONS, "## Run",
              "\n".join(f"- {k}: `{v}`" for k, v in [
                  ("kvprime", meta["versions"].get("kvprime")), ("torch", meta["versions"].get("torch")),
                  ("transformers", meta["versions"].get("transformers")), ("git commit", meta["git"]["commit"]),
                  ("git dirty", meta["git"]["dirty"]), ("seed", meta["seed"]),
                  ("sample ids sha256", meta["dataset"]["sample_ids_sha256"]),
                  ("wall time per stage (s)", meta["timings_s"])]),
              "Files: `inputs.jsonl` (evaluated samples, surrogates, similarities), `scores.jsonl`/`scores.csv` (per "
              "sample and condition), `summary.csv`, `comparisons.csv`, `analyses/*.csv`, figures (`*.png`), "
              "`results.json` (everything, with metadata), `config.json` and `.hydra/` (config). "
              "`kvprime report <this dir>` rebuilds tables, figures and this report from those files."]
    return "\n\n".join(p for p in parts if p) + "\n"
