"""Tables, diagnosis and ``report.md`` from a run's scores (no model needed)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import pandas as pd

DEFINITIONS = """\
- **NLL**: mean natural-log negative log-likelihood of the answer tokens given the cache and the prompt
  (lower is better); `nll_sum` and `n_answer_tokens` are in `scores.csv`.
- **delta** = reference NLL - condition NLL, per sample, paired by `sample_id` (positive: the condition
  is better). Against the baseline, the reference is the baseline.
- **win / tie / loss**: delta > 0 strictly / delta == 0 exactly / delta < 0; ties are counted apart.
- **d_z**: mean(delta) / std(delta, ddof=1) (Cohen's d for paired samples). std uses ddof=1 everywhere.
- **CI**: seeded bootstrap (scipy, BCa; percentile where BCa is degenerate) of mean delta.
- **p**: paired t-test (`p_ttest`) and Wilcoxon signed-rank (`p_wilcoxon`); `p_holm` is the t-test p
  Holm-adjusted over every test in this run (each condition vs baseline and each named comparison).
- **verdict**: better/worse when p_holm < alpha, else "no significant difference".
- Non-finite NLLs are flagged (`n_nonfinite`) and never averaged."""


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    columns = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in df.iterrows():
        cells = [("" if (df[c].dtype == object and isinstance(row[c], float) and math.isnan(row[c]))
                  else _fmt(row[c])) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        })
    return out


def diagnosis_text(items: Sequence[Mapping]) -> str:
    lines = []
    for d in items:
        sig = "significant" if d["significant"] else "not significant"
        lines.append(
            f"- **[{d['status']}] {d['check']}**: {d['text']} (mean delta {d['mean_delta']:+.4f} vs threshold "
            f"±{d['threshold']:g}; 95% CI [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]; p_holm {_fmt(d['p_holm'])}, {sig})"
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
                   "win_rate", "tie_rate", "p_ttest", "p_wilcoxon", "p_holm", "d_z", "verdict")
COMPARISON_COLUMNS = ("name", "treatment", "reference", "n", "mean_delta", "ci_low", "ci_high", "win_rate",
                      "tie_rate", "p_ttest", "p_wilcoxon", "p_holm", "d_z", "verdict")


ANALYSIS_TITLES = {
    "critical": "Critical test: does RoPE correction fix truncation? (C1 broken vs C2 corrected vs A1)",
    "surrogate_quality": "Surrogate quality (all truncated and RoPE-corrected) against A1",
    "full_vs_truncated": "Full context vs truncated: is the benefit baked into the cache?",
    "ordering": "Ordering: surrogate before vs after the document",
    "similarity_correlation": "Surrogate-query similarity vs benefit (Pearson)",
    "quartiles": "C2's win rate by baseline difficulty (A1 NLL quartile)",
    "numerical_floor": "Numerical floor: re-rotation vs exact shift, and the offset control",
    "routing_choices": "Routing: which cache each router chose",
}


def inspect_text(inspect: Mapping) -> str:
    conds = inspect["conditions"]
    lines = [f"Sample `{inspect['sample_id']}`.", "",
             "| condition | cache length | kept segments | sink | prefix (cut or kept) | document | positions | "
             "scoring from |", "|---|---|---|---|---|---|---|---|"]
    for name, c in conds.items():
        seg, pos = c["segments"], c["cache_position_ids"]
        lines.append(f"| {name} | {c['cache_len']} | {', '.join(c['kept_segments'])} | {len(seg['sink'])} | "
                     f"{len(seg['prefix'])} | {len(seg['document'])} | {pos[0]}..{pos[-1]} | {c['next_position']} |")
    lens = {c["cache_len"] for c in conds.values()}
    lines += ["", f"Cache lengths {'match' if len(lens) == 1 else 'DIFFER'}; document token ids "
              f"{'identical' if inspect['same_document_ids'] else 'DIFFER'} across the two conditions.", "",
              "Per-layer similarity of the document's entries (cosine over all heads and positions; max |diff|):", "",
              "| layer | keys cos | keys max abs diff | values cos | values max abs diff |", "|---|---|---|---|---|"]
    for r in inspect["layers"]:
        lines.append(f"| {r['layer']} | {r['keys_cos']:.6f} | {r['keys_max_abs_diff']:.3e} | {r['values_cos']:.6f} | "
                     f"{r['values_max_abs_diff']:.3e} |")
    return "\n".join(lines)


def render(results: Mapping, summary: pd.DataFrame, comparisons: pd.DataFrame, *,
           analyses: Mapping[str, pd.DataFrame] | None = None, inspect: Mapping | None = None) -> str:
    exp, meta = results["experiment"], results["metadata"]
    conds = results["conditions"]
    parts = [
        f"# {exp['name']}: {exp.get('title', '')}".rstrip(": "),
        exp.get("description", "").strip(),
        f"Model **{meta['model']['name']}** ({meta['model'].get('dtype')}, {meta['environment']['device']}), "
        f"dataset **{meta['dataset']['name']}**: {results['counts']['scored_samples']} samples scored "
        f"({results['counts']['skipped_samples']} skipped as too long, {results['counts']['rejected_records']} "
        f"records rejected at load). Baseline: `{exp['baseline']}`. Sink policy: `{meta['model']['sink']}`.",
        "## Conditions",
        markdown_table(pd.DataFrame([{"condition": n, **c} for n, c in conds.items()]),
                       ("condition", "builder", "surrogate", "rope_fix", "position_offset", "description")),
        "## Results against the baseline",
        "Sorted as run; delta > 0 means the condition has lower NLL than the baseline.",
        markdown_table(summary, SUMMARY_COLUMNS),
    ]
    if len(comparisons):
        parts += ["## Named comparisons", "delta = reference NLL - treatment NLL (positive: treatment better).",
                  markdown_table(comparisons, COMPARISON_COLUMNS)]
    for key, fname in (results.get("figures") or {}).items():
        parts += [f"![{key}]({fname})"]
    for name, table in (analyses or {}).items():
        parts += [f"## {ANALYSIS_TITLES.get(name, name)}",
                  markdown_table(table, list(table.columns)) if len(table) else "_(no data: conditions missing)_"]
    if results.get("diagnosis"):
        parts += ["## Diagnosis", "The notebook's rules (thresholds on the mean delta), with the statistics "
                  "beside each call.", diagnosis_text(results["diagnosis"])]
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
