"""``report.html`` of a run and ``sweep_report.html`` of a sweep: one self-contained page each, rendered by Jinja2
(autoescape on) from ``kvprime/reporting/templates``.

The run's page holds what ``report.md`` holds (header, tables with verdicts coloured and sortable columns, figures,
notes) and a sample browser: every sample's documents, question, answers and, per condition, surrogate, NLL, delta
against the baseline, decoded answer and per-token answer NLL. It must open from ``file://`` with nothing beside
it, so figures are ``data:`` URIs, the script is inlined and the per-sample data is a ``<script
type="application/json">`` block (a browser refuses ``fetch()`` of a sibling file there). Documents and surrogate
texts repeat across samples and conditions, so each distinct text is stored once and referred to by index.

Per-token values are shown as coloured cells by answer-token index, not as token strings: decoding ids needs the
run's tokenizer, which the model-free ``kvprime report`` does not load.

Given the same files the pages are the same bytes: no timestamps, JSON with sorted keys, numbers rounded by one rule.
"""

from __future__ import annotations

import base64
import functools
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import jinja2
import markupsafe
import numpy as np
import pandas as pd

from . import answer_report
from .report import COMPARISON_COLUMNS, COST_COLUMNS, DEFINITIONS, SUMMARY_COLUMNS, rejection_counts, statistics_text
from .tables import missing, number

PAGE = "report.html"
SWEEP_PAGE = "sweep_report.html"
# Enough digits that a condition and its exact-RoPE twin (differing by ~1e-6 nats) stay apart in the browser.
NLL_DIGITS = 7
TOKEN_DIGITS = 4
# Samples whose score lines are made Python objects at once while the page is written (memory, not output).
_SAMPLES_PER_CHUNK = 512
COST_FORMATS = {"index_tokens": ".0f", "generated_tokens": ".0f", "query_tokens": ".0f", "index_gflop": ".3f",
                "extra_index_gflop": ".3f", "extra_index_s": ".3f", "query_gflop": ".3f",
                "delta_per_index_tflop": ".3g", "answer_tokens": ".1f", "answer_gflop": ".3f"}
# report.md's column orders with the verdict moved up beside what the row is, so the coloured column is in view
# without scrolling a wide table sideways.
SUMMARY_ORDER = ("condition", "verdict", *(c for c in SUMMARY_COLUMNS[1:] if c != "verdict"))
COMPARISON_ORDER = (*COMPARISON_COLUMNS[:3], "verdict", *(c for c in COMPARISON_COLUMNS[3:] if c != "verdict"))
# Per-sample fields of scores.jsonl shown by the browser, and their names in the page's JSON.
SCORE_FIELDS = {"surrogate": "surrogate", "generated_answer": "answer", "exact_match": "em", "f1": "f1",
                "contains": "contains", "similarity": "similarity"}


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("kvprime.reporting", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    # tojson escapes <, >, & and ' (a document holding "</script>" cannot end the data block); compact and sorted
    # for stable bytes; NaN is refused because JSON.parse would refuse it in the browser.
    env.policies["json.dumps_kwargs"] = {"sort_keys": True, "separators": (",", ":"), "allow_nan": False,
                                         "ensure_ascii": False}
    return env


# ---------------------------------------------------------------- tables and figures
def cell(value, fmt=None, column: str = "") -> dict:
    """A table cell: its text (as report.md formats it), the value it sorts by, and a verdict's CSS class."""
    if missing(value):
        return {"text": "", "sort": "", "cls": ""}
    if isinstance(value, (bool, np.bool_)):
        text, sort = str(bool(value)), str(bool(value))
    elif isinstance(value, (int, np.integer)):
        text = format(value, fmt) if fmt else str(int(value))
        sort = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = format(float(value), fmt) if fmt else number(value)
        sort = repr(float(value))
    else:
        text = sort = str(value)
    cls = f"verdict-{text.replace(' ', '-')}" if column in ("verdict", "status") else ""
    return {"text": text, "sort": sort, "cls": cls}


def table(data, columns: Sequence[str] | None = None, formats: Mapping[str, str] | None = None) -> dict:
    """``{"columns", "rows"}`` of cells from a DataFrame or a list of dicts; ``columns`` absent from the data are left
    out."""
    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
    cols = list(frame.columns) if columns is None else [c for c in columns if c in frame.columns]
    formats = formats or {}
    values = [frame[c].tolist() for c in cols]
    return {"columns": cols, "rows": [[cell(v, formats.get(c), c) for c, v in zip(cols, row, strict=True)]
                                      for row in zip(*values, strict=True)] if cols else []}


# report.md's texts use three inline marks; the page shows them as markup, everything else as escaped text.
INLINE_MARKS = ((re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
                (re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"), r"<em>\1</em>"))


def inline_markdown(text: str) -> markupsafe.Markup:
    """``text`` escaped, then its ``**bold**``, ```code``` and ``*emphasis*`` as tags (the marks never span an
    escaped tag, since escaping leaves no ``<`` for them to wrap)."""
    out = str(markupsafe.escape(text))
    for pattern, repl in INLINE_MARKS:
        out = pattern.sub(repl, out)
    return markupsafe.Markup(out)


def definitions() -> list[markupsafe.Markup]:
    """report.md's definitions, one item per ``- `` bullet."""
    items = re.split(r"^- ", DEFINITIONS, flags=re.M)
    return [inline_markdown(" ".join(i.split())) for i in items if i.strip()]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figures(run_dir: Path, names: Mapping[str, str]) -> list[dict]:
    """The run's figures as ``data:`` URIs, in results.json's order (one a run did not draw is left out)."""
    return [{"key": key, "file": name, "src": data_uri(run_dir / name)}
            for key, name in names.items() if (run_dir / name).is_file()]


# ---------------------------------------------------------------- the sample browser's data
def rounded(value, digits: int = NLL_DIGITS):
    """A float with ``digits`` significant digits (None where it does not apply or is not finite)."""
    if missing(value) or isinstance(value, str):
        return None
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


class Texts:
    """Distinct texts, each stored once; a sample refers to its documents and surrogates by index."""

    def __init__(self):
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, text) -> int | None:
        if not isinstance(text, str):
            return None
        if text not in self._index:
            self._index[text] = len(self.items)
            self.items.append(text)
        return self._index[text]


def _score_entry(row: Mapping, base_nll, texts: Texts) -> dict:
    nll = row.get("nll")
    entry = {"nll": rounded(nll), "delta": None if base_nll is None or missing(nll) else rounded(base_nll - nll)}
    for field, key in SCORE_FIELDS.items():
        value = row.get(field)
        if field == "surrogate":
            entry[key] = texts.add(value)
        elif field == "generated_answer":
            entry[key] = value if isinstance(value, str) else None
        else:
            entry[key] = rounded(value, 4)
    if isinstance(row.get("routed_to"), str):
        entry["routed_to"] = row["routed_to"]
    tokens = row.get("token_logprobs")
    if isinstance(tokens, list):
        entry["token_nll"] = [rounded(-t, TOKEN_DIGITS) for t in tokens]
    return {k: v for k, v in entry.items() if v is not None}


def _rows_by_sample(frame: pd.DataFrame, columns: Sequence[str]) -> dict[str, dict[str, dict]]:
    """sample_id -> condition -> that score line's ``columns`` (the frame read column-wise: one pass, no Series)."""
    cols = [c for c in columns if c in frame.columns]
    out: dict[str, dict[str, dict]] = {}
    for values in zip(*(frame[c].tolist() for c in cols), strict=True):
        row = dict(zip(cols, values, strict=True))
        out.setdefault(str(row["sample_id"]), {})[row["condition"]] = row
    return out


def _lines_in_chunks(records: Iterable[Mapping], frames: Sequence[pd.DataFrame], columns: Sequence[str]):
    """(record, {condition: score line}) per record, in the records' order. The lines are turned into Python
    objects a chunk of samples at a time, so the page of a large run never holds every line as a dict."""
    # Keyed by the id as text, as the records' ids are compared.
    positions = [{str(k): v for k, v in f.groupby("sample_id", sort=False).indices.items()} if len(f) else {}
                 for f in frames]
    it = iter(records)
    while chunk := list(itertools.islice(it, _SAMPLES_PER_CHUNK)):
        ids = [str(rec["sample_id"]) for rec in chunk]
        lines: dict[str, dict[str, dict]] = {}
        for frame, index in zip(frames, positions, strict=True):
            rows = [index[i] for i in ids if i in index]
            if rows:  # frame order within a sample: a later line of one (sample, condition) wins, as before
                for sid, by_cond in _rows_by_sample(frame.take(np.sort(np.concatenate(rows))), columns).items():
                    lines.setdefault(sid, {}).update(by_cond)
        for rec, sid in zip(chunk, ids, strict=True):
            yield rec, lines.get(sid, {})


def _samples(inputs: Iterable[Mapping], scores: pd.DataFrame, derived: pd.DataFrame, texts: Texts, *,
             baseline: str, conditions: Sequence[str], skipped: Sequence[Mapping]) -> Iterator[dict]:
    """Each selected sample's entry of the browser's JSON, in run order (texts are added to ``texts``)."""
    wanted = ["sample_id", "condition", "nll", "token_logprobs", "answer_token_ids", *SCORE_FIELDS, "routed_to"]
    why = {str(s["sample_id"]): s.get("reason", "") for s in skipped}
    for rec, rows in _lines_in_chunks(inputs, [scores, derived], wanted):
        sid = str(rec["sample_id"])
        base = rows.get(baseline, {}).get("nll")
        base = None if base is None or missing(base) else float(base)
        docs = rec.get("passages") or [rec.get("passage", "")]
        answers = [a for a in rec.get("answers") or [] if a != rec.get("answer")]
        sample = {"id": sid, "query": rec.get("query", ""), "answer": rec.get("answer", ""), "answers": answers,
                  "docs": [texts.add(d) for d in docs], "gold": rec.get("gold_slot") if rec.get("passages") else None,
                  "scores": {c: _score_entry(rows[c], base, texts) for c in conditions if c in rows}}
        ids = next((r["answer_token_ids"] for r in rows.values() if isinstance(r.get("answer_token_ids"), list)), None)
        if ids is not None:
            sample["answer_ids"] = [int(i) for i in ids]
        if sid in why:
            sample["skipped"] = why[sid]
        yield {k: v for k, v in sample.items() if v is not None}


def sample_data(inputs: Iterable[Mapping], scores: pd.DataFrame, derived: pd.DataFrame, *, baseline: str,
                conditions: Sequence[str], skipped: Sequence[Mapping] = ()) -> dict:
    """The browser's JSON: every selected sample in run order with its documents (``gold``: the gold passage's
    index in a multi-document sample), question, answers and, per condition, its score line; skipped samples
    carry their reason instead of scores."""
    texts = Texts()
    samples = list(_samples(inputs, scores, derived, texts, baseline=baseline, conditions=conditions,
                            skipped=skipped))
    return {"baseline": baseline, "conditions": list(conditions), "texts": texts.items, "samples": samples}


def sample_json(inputs: Iterable[Mapping], scores: pd.DataFrame, derived: pd.DataFrame, *, baseline: str,
                conditions: Sequence[str], skipped: Sequence[Mapping] = ()) -> Iterator[markupsafe.Markup]:
    """``sample_data`` as the template's ``tojson`` writes it, in pieces: one sample at a time, then the texts
    (keys sorted: "samples" comes before "texts", which is complete only after the last sample)."""
    env = environment()

    def dumps(obj) -> markupsafe.Markup:
        return jinja2.utils.htmlsafe_json_dumps(obj, dumps=env.policies["json.dumps_function"],
                                                **env.policies["json.dumps_kwargs"])

    texts = Texts()
    yield markupsafe.Markup('{"baseline":') + dumps(baseline) + markupsafe.Markup(',"conditions":') + \
        dumps(list(conditions)) + markupsafe.Markup(',"samples":[')
    for i, sample in enumerate(_samples(inputs, scores, derived, texts, baseline=baseline, conditions=conditions,
                                        skipped=skipped)):
        yield markupsafe.Markup(",") + dumps(sample) if i else dumps(sample)
    yield markupsafe.Markup('],"texts":') + dumps(texts.items) + markupsafe.Markup("}")


# ---------------------------------------------------------------- the run's page
def cache_check(inspect: Mapping | None) -> dict | None:
    """``inspect.json`` (the cache-shape check and per-layer similarity of ``experiment.inspect``) as two tables."""
    if not inspect:
        return None
    conds = inspect["conditions"]
    shapes = [{"condition": name, "cache length": c["cache_len"], "kept segments": ", ".join(c["kept_segments"]),
               "sink": len(c["segments"]["sink"]), "prefix (cut or kept)": len(c["segments"]["prefix"]),
               "document": len(c["segments"]["document"]),
               "positions": f"{c['cache_position_ids'][0]}..{c['cache_position_ids'][-1]}",
               "scoring from": c["next_position"]} for name, c in conds.items()]
    layers = [{"layer": r["layer"], "keys cos": r["keys_cos"], "keys max abs diff": r["keys_max_abs_diff"],
               "values cos": r["values_cos"], "values max abs diff": r["values_max_abs_diff"]}
              for r in inspect["layers"]]
    return {"sample_id": inspect["sample_id"], "shapes": table(shapes),
            "layers": table(layers, formats={"keys cos": ".6f", "keys max abs diff": ".3e", "values cos": ".6f",
                                             "values max abs diff": ".3e"}),
            "lengths_match": len({c["cache_len"] for c in conds.values()}) == 1,
            "same_document_ids": bool(inspect["same_document_ids"])}


def _run_facts(meta: Mapping) -> list[tuple[str, str]]:
    timings = meta.get("timings_s") or {}
    return [("kvprime", meta["versions"].get("kvprime")), ("torch", meta["versions"].get("torch")),
            ("transformers", meta["versions"].get("transformers")), ("git commit", meta["git"]["commit"]),
            ("git dirty", meta["git"]["dirty"]), ("seed", meta["seed"]),
            ("sample ids sha256", meta["dataset"]["sample_ids_sha256"]),
            ("wall time per stage (s)", ", ".join(f"{k} {v}" for k, v in timings.items()))]


def _header(results: Mapping) -> list[tuple[str, str]]:
    exp, meta, counts = results["experiment"], results["metadata"], results["counts"]
    model, data = meta["model"], meta["dataset"]
    return [
        ("Experiment", f"{exp['name']}: {exp.get('title') or ''}".rstrip(": ")),
        ("Model", f"{model['name']} ({model.get('dtype')}, {meta['environment']['device']}); sink policy "
                  f"{model.get('sink')}"),
        ("Data set", f"{data['name']}: {counts['scored_samples']} samples scored ({counts['skipped_samples']} "
                     f"skipped as too long, {counts['rejected_records']} records rejected at load)"),
        ("Baseline", str(exp["baseline"])),
        ("Statistics and numerical floor", statistics_text(results.get("statistics"), results.get("numerical_floor"))),
    ]


def _tables(results: Mapping, summary: pd.DataFrame, comparisons: pd.DataFrame, analyses, titles) -> dict:
    out = {
        "conditions": table([{"condition": n, **c} for n, c in results["conditions"].items()],
                            ("condition", "builder", "surrogate", "rope_fix", "position_offset", "description")),
        "summary": table(summary, SUMMARY_ORDER),
        "comparisons": table(comparisons, COMPARISON_ORDER) if len(comparisons) else None,
        "answers": None, "answer_comparisons": None, "answer_stops": None, "costs": None, "generated": None,
        "analyses": [{"title": (titles or {}).get(k, k), "table": table(v)} for k, v in (analyses or {}).items()],
    }
    part = results.get("answer_quality")
    if part:
        out["answers"] = table(part["summary"], answer_report.SUMMARY_COLUMNS, answer_report.COUNTS)
        if part.get("comparisons"):
            out["answer_comparisons"] = table(part["comparisons"], answer_report.COMPARISON_COLUMNS,
                                              answer_report.COUNTS)
        if part.get("stops"):
            out["answer_stops"] = table(part["stops"])
    if results.get("costs"):
        costs = pd.DataFrame(results["costs"])
        decoded = "answer_gflop" in costs and costs["answer_gflop"].notna().any()
        out["costs"] = table(costs, COST_COLUMNS + (("answer_tokens", "answer_gflop") if decoded else ()),
                             COST_FORMATS)
    if results.get("generated_surrogates"):
        out["generated"] = table(results["generated_surrogates"]["table"])
    return out


def render_pieces(run_dir, results: Mapping, summary: pd.DataFrame, comparisons: pd.DataFrame, *,
                  inputs: Iterable[Mapping], scores: pd.DataFrame, derived: pd.DataFrame,
                  analyses: Mapping[str, pd.DataFrame] | None = None, titles: Mapping[str, str] | None = None,
                  inspect: Mapping | None = None) -> Iterator[str]:
    """The run's ``report.html`` from what finalize computed and the run's files (figures, inputs, scores), in
    pieces for ``write_atomic`` to stream: the per-sample data is written one sample at a time."""
    run_dir = Path(run_dir)
    exp, meta = results["experiment"], results["metadata"]
    names = list(results["conditions"]) + [r["name"] for r in results.get("derived") or []]
    gen = results.get("generated_surrogates") or {}
    return environment().get_template("report.html.j2").generate(
        # Not the directory's name: a merge renames its work folder into place, and a copied run is the same run.
        title=f"{exp['name']}: {exp['title']}" if exp.get("title") else exp["name"], experiment=exp,
        header=_header(results),
        tables=_tables(results, summary, comparisons, analyses, titles), figures=figures(run_dir, results["figures"]),
        answer_part=results.get("answer_quality"), worth_it=[inline_markdown(w) for w in results.get("worth_it") or []],
        generator=(gen.get("generator") or {}), generated_warnings=gen.get("warnings") or [],
        diagnosis=results.get("diagnosis") or [], cache_check=cache_check(inspect),
        notes=[inline_markdown(n) for n in results.get("notes") or [] if n], skipped=results.get("skipped") or [],
        rejected=rejection_counts(results.get("rejected") or []), definitions=definitions(),
        run_facts=_run_facts(meta),
        tie=float((results.get("statistics") or {}).get("tie_tolerance") or 0.0),
        samples=sample_json(inputs, scores, derived, baseline=exp["baseline"], conditions=names,
                            skipped=results.get("skipped") or []))



# ---------------------------------------------------------------- a sweep's page
def render_sweep(sweep_dir, *, jobs: Sequence[Mapping], swept: Sequence[str], summary: pd.DataFrame,
                 baseline: str | None, counts: Mapping[str, int], failed: Sequence[Mapping], figure: str | None,
                 resume_cmd: str | None, unchanged: Sequence[Mapping] = ()) -> str:
    """``sweep_report.html``: a row per job (its swept values, status, each condition's mean delta with its verdict)
    linking to the job's own ``report.html`` by relative path, the per-condition table and the sweep's figure.

    ``jobs``: dicts with ``job``, ``dir`` (a Path or None), ``status``, ``values`` (label per swept key),
    ``overrides`` (all of the job's overrides, as one line) and ``error_message``; ``unchanged``: the conditions
    no job's overrides touch, compared across jobs (``untouched_conditions``)."""
    sweep_dir = Path(sweep_dir)
    treated = [c for c in dict.fromkeys(summary["condition"]) if c != baseline] if len(summary) else []
    by = {(r["job"], r["condition"]): r for r in summary.to_dict(orient="records")}
    rows = []
    for j in jobs:
        page = j["dir"] / PAGE if j["dir"] is not None else None
        link = f"{page.parent.relative_to(sweep_dir).as_posix()}/{PAGE}" if page and page.is_file() else None
        base = by.get((j["job"], baseline), {})
        cells = [cell(j["values"].get(k)) for k in swept] + [cell(j["status"], column="status"),
                                                             cell(base.get("n")), cell(base.get("mean_nll"))]
        for c in treated:
            r = by.get((j["job"], c), {})
            cells.append({**cell(r.get("mean_delta")), "cls": cell(r.get("verdict"), column="verdict")["cls"],
                          "title": str(r.get("verdict") or "")})
        cells.append(cell(j.get("overrides") or ""))
        rows.append({"job": j["job"], "link": link, "cells": cells, "error": j.get("error_message") or ""})
    columns = [*swept, "status", "n", f"mean NLL ({baseline})", *(f"delta {c}" for c in treated), "overrides"]
    untouched = table([{"condition": u["condition"], "jobs": ", ".join(map(str, u["jobs"])),
                        "samples compared": u["samples"], "max abs NLL difference": u["max_abs_diff"]}
                       for u in unchanged], formats={"max abs NLL difference": ".2e"}) if unchanged else None
    fig = sweep_dir / figure if figure else None
    return environment().get_template("sweep_report.html.j2").render(
        title=f"Sweep report: {sweep_dir.name}", sweep_name=sweep_dir.name, swept=list(swept), baseline=baseline,
        counts={k: v for k, v in counts.items() if v}, failed=list(failed), resume_cmd=resume_cmd,
        job_columns=columns, job_rows=rows, summary=table(summary), untouched=untouched,
        figure=data_uri(fig) if fig is not None and fig.is_file() else None)
