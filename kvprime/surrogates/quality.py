"""Is a generated surrogate a query at all? A table per generated-surrogate condition, and plain warnings.

A priming experiment with generated surrogates means little if the generator wrote no queries: a small model
asked for "the question this document answers" often returns the document's first sentence, the same line
for every template, or a label. This module measures that from the texts alone (no model, no torch), one row
per condition whose source generates (its declaration needs ``generated``: ``generated:<template>``,
``generated_other:<template>``, a plugin's).

Words are the lower-cased ``\\w+`` runs of a text (``"What's 2+2?"`` -> what, s, 2, 2). The columns:

``kind``
    the source's name (``generated``, ``generated_other``: before the colon); ``template`` the part after it.

``n``
    the condition's rows (one surrogate per sample); an empty or missing surrogate counts, as zero words.
``copied_share``
    the share copied from the document: the longest run of consecutive surrogate words that occurs as
    consecutive words of the document is >= ``COPY_RUN_WORDS`` (8) words, or it is >= ``COPY_MIN_WORDS`` (5)
    words and covers >= ``COPY_FRACTION`` (60%) of the surrogate's words. The 5-word floor keeps short keyword
    queries, which rightly reuse the document's terms ("super bowl 50 winner"), from counting as copies.
    ``document`` is the sample's own passage, also for a donor's text (``generated_other``): there the share
    measures overlap with the document the surrogate primes, which the derangement keeps near zero (the donor's
    own copying shows in the matching ``generated`` row).
``identical_across_templates_share``
    the share whose text equals, after lower-casing and collapsing whitespace, the text another template
    gave the same sample under the same kind of source (``generated`` with ``generated``, ``generated_other``
    with ``generated_other``). Only rows whose sample has another template count; NaN when none has.
``question_share``
    the share that reads as a question: the text, stripped of whitespace and closing quotes or brackets,
    ends with ``?``, or its first word is an interrogative (``INTERROGATIVES``: the wh-words and the
    auxiliaries that open a yes/no question, e.g. "how", "what", "is", "can", "does").
``mean_words``
    the mean number of words.
``mean_similarity_to_query``
    the mean of the rows' ``similarity`` (surrogate-query cosine, from runs with experiment.similarity);
    NaN when no row has one.

``degenerate_warnings`` turns the table into sentences, one per condition and problem whose source's text is
written for its own document (one taking its donor's, ``generated_other``, shows the same texts, so it would
repeat them), when
``copied_share > 0.5``, ``identical_across_templates_share > 0.5``, ``mean_words < 2``, or
``question_share < 0.2`` for a template that asks for a question (``QUESTION_TEMPLATES``: keyword, symptom,
concern and messy queries are rightly not questions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import pandas as pd

from . import sources

COPY_RUN_WORDS = 8
COPY_MIN_WORDS = 5
COPY_FRACTION = 0.6
INTERROGATIVES = frozenset({
    "what", "who", "whom", "whose", "which", "when", "where", "why", "how",
    "is", "are", "was", "were", "am", "do", "does", "did", "can", "could", "should", "would", "will", "shall",
    "may", "might", "must", "has", "have", "had",
})
# The templates whose prompt asks for a question: only there is a low question share a problem.
QUESTION_TEMPLATES = frozenset({"target_question", "exp01"})
# degenerate_warnings' thresholds.
MAX_COPIED_SHARE = 0.5
MAX_IDENTICAL_SHARE = 0.5
MIN_QUESTION_SHARE = 0.2
MIN_MEAN_WORDS = 2.0

COLUMNS = ["condition", "kind", "template", "n", "copied_share", "identical_across_templates_share", "question_share",
           "mean_words", "mean_similarity_to_query"]

_WORD = re.compile(r"\w+")
_CLOSERS = "\"'”’)]» \t\n"


def words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def longest_verbatim_run(surrogate: str | None, document: str | None) -> int:
    """The most consecutive words of ``surrogate`` found as consecutive words of ``document``."""
    s, d = words(surrogate), words(document)
    best = 0
    # Longest common substring over words: O(len(s) * len(d)), small here (a query against one passage).
    previous = [0] * (len(d) + 1)
    for i in range(1, len(s) + 1):
        current = [0] * (len(d) + 1)
        for j in range(1, len(d) + 1):
            if s[i - 1] == d[j - 1]:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def is_copied(surrogate: str | None, document: str | None) -> bool:
    """See the module docstring: a verbatim run of >= 8 words, or of >= 5 words covering >= 60% of it."""
    run = longest_verbatim_run(surrogate, document)
    n = len(words(surrogate))
    return run >= COPY_RUN_WORDS or (run >= COPY_MIN_WORDS and run >= COPY_FRACTION * n)


def is_question(surrogate: str | None) -> bool:
    """Ends with "?" (closing quotes and brackets aside) or opens with an interrogative word."""
    text = (surrogate or "").rstrip(_CLOSERS)
    first = words(surrogate)[:1]
    return text.endswith("?") or (bool(first) and first[0] in INTERROGATIVES)


def normalise(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def _mean(values: Iterable) -> float:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else float("nan")


def quality_table(rows: Iterable[Mapping]) -> pd.DataFrame:
    """One row per generated-surrogate condition (first-appearance order), columns ``COLUMNS``.

    ``rows``: one mapping per (sample, condition) with ``sample_id``, ``condition``, ``source`` (the condition's
    surrogate source, e.g. ``generated:target_question``), ``surrogate`` (text), ``document`` (the passage the
    surrogate was generated for: the sample's own), ``query`` and optionally ``similarity``. Rows of other
    sources are ignored."""
    kept = [dict(r) for r in rows if sources.generated_template(str(r.get("source") or "")) is not None]
    for r in kept:
        kind, _, r["template"] = str(r["source"]).partition(":")
        r["kind"], r["norm"] = kind, normalise(r.get("surrogate"))
    # (sample, kind) -> template -> normalised text, for the across-templates comparison.
    texts: dict[tuple, dict[str, set]] = {}
    for r in kept:
        texts.setdefault((r.get("sample_id"), r["kind"]), {}).setdefault(r["template"], set()).add(r["norm"])
    out = []
    for condition in dict.fromkeys(r["condition"] for r in kept):
        group = [r for r in kept if r["condition"] == condition]
        identical = []
        for r in group:
            others = {t: v for t, v in texts[(r.get("sample_id"), r["kind"])].items() if t != r["template"]}
            if others:
                identical.append(any(r["norm"] in v for v in others.values()))
        out.append({
            "condition": condition,
            "kind": group[0]["kind"],
            "template": group[0]["template"],
            "n": len(group),
            "copied_share": _mean(is_copied(r.get("surrogate"), r.get("document")) for r in group),
            "identical_across_templates_share": _mean(identical),
            "question_share": _mean(is_question(r.get("surrogate")) for r in group),
            "mean_words": _mean(len(words(r.get("surrogate"))) for r in group),
            "mean_similarity_to_query": _mean(r.get("similarity") for r in group),
        })
    return pd.DataFrame(out, columns=COLUMNS)


def rows_from_run(inputs: Iterable[Mapping], conditions: Mapping[str, Mapping]) -> list[dict]:
    """``quality_table``'s rows from a run directory's files: ``inputs`` are inputs.jsonl's records
    (``sample_id``, ``passage``, ``query``, ``surrogates`` and ``similarity``: {condition: value}) and
    ``conditions`` is plan.json's ``conditions`` (name -> its settings, ``surrogate`` being the source)."""
    rows = []
    for rec in inputs:
        sims = rec.get("similarity") or {}
        for name, text in (rec.get("surrogates") or {}).items():
            if name not in conditions:
                continue
            rows.append({"sample_id": rec["sample_id"], "condition": name,
                         "source": conditions[name].get("surrogate"), "surrogate": text,
                         "document": rec.get("passage"), "query": rec.get("query"), "similarity": sims.get(name)})
    return rows


def _own_document(kind: str) -> bool:
    """Whether the source named ``kind`` writes its text for the sample's own document."""
    return kind in sources.SOURCE_REGISTRY and sources.SOURCE_REGISTRY.get(kind).document == "own"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def degenerate_warnings(table: pd.DataFrame) -> list[str]:
    """Plain-English warnings for the conditions whose surrogates look degenerate (thresholds: module
    docstring); empty when none does."""
    out = []
    for r in table.to_dict("records"):
        if not _own_document(r["kind"]):
            continue
        name = f"{r['condition']} ({r['template']}, {r['n']} surrogates)"
        if r["copied_share"] > MAX_COPIED_SHARE:
            out.append(f"{name}: {_pct(r['copied_share'])} of the surrogates copy a long verbatim run of their "
                       f"document (>= {COPY_RUN_WORDS} words, or >= {COPY_MIN_WORDS} words making up >= "
                       f"{_pct(COPY_FRACTION)} of the surrogate): the generator is echoing the document rather "
                       "than writing queries, so this condition primes with document text.")
        share = r["identical_across_templates_share"]
        if not math.isnan(share) and share > MAX_IDENTICAL_SHARE:
            out.append(f"{name}: {_pct(share)} of the surrogates are identical to another template's surrogate of "
                       "the same document: the templates do not produce different queries, so comparing or "
                       "routing between them compares the same text.")
        if r["template"] in QUESTION_TEMPLATES and r["question_share"] < MIN_QUESTION_SHARE:
            out.append(f"{name}: only {_pct(r['question_share'])} of the surrogates read as a question (ending in "
                       "'?' or opening with a question word), although the template asks for one.")
        if r["mean_words"] < MIN_MEAN_WORDS:
            out.append(f"{name}: the surrogates have {r['mean_words']:.1f} words on average: mostly empty or "
                       "single words.")
    return out
