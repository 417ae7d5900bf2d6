"""Answer quality beside NLL: SQuAD exact match, token F1 and "contains" of a generated answer, and their paired
tests.

Scoring follows the official SQuAD v1.1 evaluation script (``evaluate-v1.1.py``): both texts are normalised
(``NORMALISATION``), exact match is 1 when the normalised texts are equal, F1 is the harmonic mean of precision and
recall of the normalised whitespace tokens (as multisets), and a prediction takes its best value over every
reference answer. ``contains`` is 1 when a normalised reference's tokens appear contiguously in the normalised
prediction's tokens (the accuracy of open-domain QA with chatty LLMs: Liu et al. 2023 "Lost in the Middle", Mallen
et al. 2023, Kandpal et al. 2023): an instruct model answers in a sentence, which EM scores 0 even when it is
right. These few lines are written out rather than imported: the script is not packaged, and the
``evaluate`` library would pull a hub-backed download for one function.

Paired statistics, every test a (reference, treatment) pair of conditions matched by ``sample_id``:

* exact match: McNemar's exact test (statsmodels ``mcnemar(exact=True)``: a two-sided binomial test of the
  discordant pairs), with ``em_gained`` (the treatment right where the reference is wrong) and ``em_lost``;
* contains: the same test, ``contains_gained`` and ``contains_lost``, over the pairs that have it (score lines
  written before it existed lack it: missing, NaN);
* F1: the run's paired tests and bootstrap CI (``kvprime.analysis.stats.paired_test``) with delta = treatment F1 -
  reference F1 (positive: the treatment answers better; note NLL's delta is reference - treatment, so for both a
  positive delta means the treatment is better) and no tie tolerance (F1 is computed exactly);
* Holm: the EM McNemar p-values of all distinct tests of the run form one family, the contains McNemar p-values
  another, the F1 t-test p-values a third.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np
import pandas as pd
from statsmodels.stats.contingency_tables import mcnemar

from . import stats

NORMALISATION = ("lower-cased, punctuation (Python's string.punctuation) removed, the articles a/an/the removed, "
                 "whitespace collapsed (the official SQuAD v1.1 evaluation script)")
SCORE_FIELDS = ("generated_answer", "exact_match", "f1", "contains")
# Score fields that older score lines lack: missing (NaN) there, never an error.
LATER_SCORE_FIELDS = ("contains",)
_VALUES = ["exact_match", "f1", "contains"]
_NAN = float("nan")
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

SUMMARY_FIELDS = ("n_answers", "em", "f1", "contains", "em_delta", "em_gained", "em_lost", "p_mcnemar",
                  "p_mcnemar_holm", "contains_delta", "contains_gained", "contains_lost", "p_mcnemar_contains",
                  "p_mcnemar_contains_holm", "f1_delta", "f1_ci_low", "f1_ci_high", "f1_win_rate", "f1_loss_rate",
                  "f1_p_ttest", "f1_p_wilcoxon", "f1_p_holm")
COMPARISON_FIELDS = tuple(f for f in SUMMARY_FIELDS if f not in ("em", "f1", "contains"))


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    return float(max(normalize(prediction) == normalize(r) for r in _refs(references)))


def f1(prediction: str, references) -> float:
    """The best token F1 of the prediction over the references."""
    return max(_f1(prediction, r) for r in _refs(references))


def contains(prediction: str, references) -> float:
    """1.0 when a non-empty normalised reference's tokens appear contiguously in the normalised prediction's tokens
    (a substring on whole-token boundaries: "19670" does not contain "1967"), else 0.0."""
    pred = normalize(prediction).split()
    for r in _refs(references):
        ref = normalize(r).split()
        if ref and any(pred[i:i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1)):
            return 1.0
    return 0.0


def _refs(references) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs


def score_fields(text: str, references) -> dict:
    """What a score line stores about a generated answer."""
    return {"generated_answer": text, "exact_match": exact_match(text, references), "f1": f1(text, references),
            "contains": contains(text, references)}


def frame(scores: pd.DataFrame, derived: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long (sample_id, condition, exact_match, f1, contains) rows; a derived (routed) condition takes the answer of
    the cache it routed to. Scores without ``contains`` (written before it existed) get NaN there."""
    out = scores.reindex(columns=["sample_id", "condition", *_VALUES])
    if derived is not None and len(derived):
        src = out.set_index(["sample_id", "condition"])
        keys = list(zip(derived["sample_id"], derived["routed_to"], strict=True))
        routed = pd.DataFrame({"sample_id": derived["sample_id"].to_numpy(),
                               "condition": derived["condition"].to_numpy(),
                               **{v: src[v].reindex(keys).to_numpy() for v in _VALUES}})
        out = pd.concat([out, routed], ignore_index=True)
    out[_VALUES] = out[_VALUES].astype(float)
    return out


def mcnemar_exact(reference, treatment) -> dict:
    """McNemar's exact test of paired 0/1 outcomes: discordant counts and the two-sided p (NaN with none)."""
    ref, trt = np.asarray(reference, dtype=bool), np.asarray(treatment, dtype=bool)
    gained, lost = int(np.sum(trt & ~ref)), int(np.sum(ref & ~trt))
    table = [[int(np.sum(ref & trt)), lost], [gained, int(np.sum(~ref & ~trt))]]
    p = float(mcnemar(table, exact=True).pvalue) if gained + lost else _NAN
    return {"em_gained": gained, "em_lost": lost, "p_mcnemar": p}


def paired(reference: pd.DataFrame, treatment: pd.DataFrame, *, n_boot: int, seed: int, confidence: float,
           alpha: float) -> dict:
    """Exact match, contains and F1 of ``treatment`` against ``reference`` (each indexed by sample_id), paired on the
    samples both have (contains: on those where both have it)."""
    j = pd.concat({"r": reference, "t": treatment}, axis=1, join="inner").sort_index()
    both = j.dropna(subset=[(s, v) for s in "rt" for v in ("exact_match", "f1")])
    r_em, t_em = both[("r", "exact_match")].to_numpy(), both[("t", "exact_match")].to_numpy()
    r_f1, t_f1 = both[("r", "f1")].to_numpy(), both[("t", "f1")].to_numpy()
    out = {"n_answers": len(both), "em_delta": float(np.mean(t_em - r_em)) if len(both) else _NAN,
           **mcnemar_exact(r_em, t_em)}
    has = j.dropna(subset=[("r", "contains"), ("t", "contains")]) if ("r", "contains") in j else j.iloc[:0]
    if len(has):
        r_c, t_c = has[("r", "contains")].to_numpy(), has[("t", "contains")].to_numpy()
        m = mcnemar_exact(r_c, t_c)
        out.update(contains_delta=float(np.mean(t_c - r_c)), contains_gained=m["em_gained"],
                   contains_lost=m["em_lost"], p_mcnemar_contains=m["p_mcnemar"])
    else:  # no pair has it (score lines written before it existed): missing, not zero
        out.update(contains_delta=_NAN, contains_gained=_NAN, contains_lost=_NAN, p_mcnemar_contains=_NAN)
    # paired_test's delta is its first argument minus its second: the treatment first, so a better answer is > 0.
    res = stats.paired_test(t_f1, r_f1, n_boot=n_boot, seed=seed, confidence=confidence, alpha=alpha)
    out.update(f1_delta=res["mean_delta"], f1_ci_low=res["ci_low"], f1_ci_high=res["ci_high"],
               f1_win_rate=res["win_rate"], f1_loss_rate=res["loss_rate"], f1_p_ttest=res["p_ttest"],
               f1_p_wilcoxon=res["p_wilcoxon"])
    return out


def summarize(answers: pd.DataFrame, *, baseline: str, conditions: list[str], comparisons: list[dict] | None = None,
              n_boot: int = stats._DEFAULT.n_boot, seed: int = 0, confidence: float = stats._DEFAULT.confidence,
              alpha: float = stats._DEFAULT.alpha) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per condition (``SUMMARY_FIELDS``, keyed by ``condition``) and per named comparison (``COMPARISON_FIELDS``,
    keyed by ``name``), the tests as in the module docstring; the baseline's own row has only its means."""
    answers = answers.reindex(columns=["sample_id", "condition", *_VALUES])
    by = {c: g.set_index("sample_id")[_VALUES] for c, g in answers.groupby("condition", sort=False)}
    tests: dict[tuple[str, str], dict] = {}

    def run(reference, treatment):
        key = (reference, treatment)
        if key not in tests:
            # Seeded by name like the NLL tests, under a name of its own so the F1 bootstrap draws other resamples.
            tests[key] = paired(by[reference], by[treatment], n_boot=n_boot, confidence=confidence, alpha=alpha,
                                seed=stats._derive_seed(seed, f"f1: {treatment} vs {reference}"))
        return key

    rows = []
    for c in conditions:
        means = by[c].mean() if c in by else pd.Series(_NAN, index=_VALUES)
        row = {"condition": c, "em": float(means["exact_match"]), "f1": float(means["f1"]),
               "contains": float(means["contains"]),
               "_key": run(baseline, c) if c != baseline and c in by and baseline in by else None}
        rows.append(row)
    comp_rows = [{"name": c["name"], "_key": run(c["reference"], c["treatment"])}
                 for c in comparisons or [] if c["reference"] in by and c["treatment"] in by]
    keys = list(tests)
    em_holm = dict(zip(keys, stats.holm([tests[k]["p_mcnemar"] for k in keys]), strict=True))
    contains_holm = dict(zip(keys, stats.holm([tests[k]["p_mcnemar_contains"] for k in keys]), strict=True))
    f1_holm = dict(zip(keys, stats.holm([tests[k]["f1_p_ttest"] for k in keys]), strict=True))
    for r in rows + comp_rows:
        key = r.pop("_key")
        if key is None:
            r["n_answers"] = int(by[r["condition"]]["f1"].notna().sum()) if r.get("condition") in by else 0
            continue
        r.update(tests[key], p_mcnemar_holm=float(em_holm[key]),
                 p_mcnemar_contains_holm=float(contains_holm[key]), f1_p_holm=float(f1_holm[key]))
    summary = pd.DataFrame(rows, columns=["condition", *SUMMARY_FIELDS])
    return summary, pd.DataFrame(comp_rows, columns=["name", *COMPARISON_FIELDS])


def stop_counts(scores: pd.DataFrame) -> pd.DataFrame:
    """Per condition, how the decoding of its answers ended (newline, eos, max_new_tokens, window)."""
    if "answer_stop" not in scores:
        return pd.DataFrame(columns=["condition"])
    t = scores.groupby(["condition", "answer_stop"], sort=False).size().unstack(fill_value=0)
    return t.reindex(pd.unique(scores["condition"])).fillna(0).astype(int).reset_index()

