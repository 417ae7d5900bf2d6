"""What each condition costs: model FLOPs from the model's shapes, at indexing time and at query time.

The cost model (docs/statistics.md, Cost model, states it too):

* **FLOPs of a forward pass** over ``tokens`` new tokens after ``context`` cached ones, with the LM head on
  ``logits`` positions: per layer the q/k/v/o projections (2 * h * (heads + 2 * kv_heads) * d +
  2 * heads * d * h per token), the gated MLP (2 * 3 * h * intermediate per token) and attention scores and
  mixing (2 * 2 * heads * d per (query, key) pair, causal within the new tokens); then the LM head
  (2 * h * vocab per logit position). Norms, RoPE and softmax are left out (under 1% at these sizes).
* **Indexing cost** of a condition, per document: its cache's encoded tokens (sink, surrogate, document and any
  suffix: the builder's ``encoded_tokens``) through the scored model with no LM head, plus, for a generated
  surrogate, the generator's prompt prefill and one forward per generated token.
* **Query-time cost**: the prompt and answer tokens scored against the cache (context = cache length).
* **Selective recompute** (builders ``*_recompute``) is query-time work: it runs when the question arrives, on the
  assembled cache. Its selection pass (token-layers of the full-attention encode up to the selection layer) and
  the recomputed tokens' layers, each at the projection and MLP cost above, plus attention over the
  (query, key) pairs they read (``recompute_key_pairs``, summed over layers), are added to the query cost; its
  measured seconds (``recompute_s``) to the query seconds.
* **Answer decoding** (runs with the ``answer`` metric): the prompt prefilled against the cache (one logit), then
  one forward per further generated token, as surrogate generation is counted; its seconds are the row's share
  of its chunk's decoding time.
* **Measured seconds**: each chunk's wall time for encoding and building (indexing) and for scoring (query),
  shared among its (sample, condition) pairs in proportion to their FLOPs; generation seconds are the
  document's share of its generation batch. Seconds depend on the device and on batching; FLOPs do not.

Shapes are recorded in the run's metadata (``model_shape``), so a report needs no model to compute FLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size")


def model_shape(config) -> dict:
    """The shape numbers the FLOP count needs, from a transformers config (its text decoder's)."""
    if isinstance(config, Mapping):
        return {k: int(config[k]) for k in SHAPE_KEYS}
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    return {"hidden_size": int(c.hidden_size), "num_hidden_layers": int(c.num_hidden_layers),
            "num_attention_heads": int(heads),
            "num_key_value_heads": int(getattr(c, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // heads),
            "intermediate_size": int(c.intermediate_size), "vocab_size": int(c.vocab_size)}


def forward_flops(shape, tokens: float, context: float = 0, logits: float = 0) -> float:
    """Matmul FLOPs of one forward (module docstring); ``shape``: ``model_shape``'s dict or a config."""
    s = model_shape(shape)
    h, heads, kv, d = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    proj = 2 * (h * heads * d + 2 * h * kv * d + heads * d * h)
    mlp = 2 * 3 * h * s["intermediate_size"]
    attended = tokens * context + tokens * (tokens + 1) / 2  # keys each new token attends to, summed
    attention = 2 * 2 * heads * d * attended
    return s["num_hidden_layers"] * (tokens * (proj + mlp) + attention) + 2 * h * s["vocab_size"] * logits


def _token_layer_flops(s: Mapping) -> float:
    """Projections and gated MLP of one token through one layer."""
    h, heads, kv, d = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    return 2 * (h * heads * d + 2 * h * kv * d + heads * d * h) + 2 * 3 * h * s["intermediate_size"]


def recompute_flops(shape, token_layers: float, key_pairs: float) -> float:
    """Matmul FLOPs of a selective recompute (selection pass included): ``token_layers`` tokens x layers through
    projections and MLP, and attention over ``key_pairs`` (query, key) pairs summed over layers. No LM head."""
    s = model_shape(shape)
    return token_layers * _token_layer_flops(s) + 2 * 2 * s["num_attention_heads"] * s["head_dim"] * key_pairs


def generation_flops(shape, prompt_tokens: float, generated_tokens: float, shared_tokens: float = 0) -> float:
    """Prefill of the prompt (one logit) and one forward per further generated token. ``shared_tokens`` of the
    prompt came from the template's shared prefix, encoded once per run (not per document): the prefill runs
    only the rest, against them."""
    if not generated_tokens:
        return 0.0
    n = int(generated_tokens)
    return forward_flops(shape, prompt_tokens - shared_tokens, shared_tokens, 1) + sum(
        forward_flops(shape, 1, prompt_tokens + j, 1) for j in range(n - 1))


COST_COLUMNS = ("index_tokens", "generated_tokens", "index_gflop", "index_s", "query_tokens", "query_gflop",
                "query_s", "answer_tokens", "answer_gflop", "answer_s", "recompute_tokens", "recompute_gflop",
                "recompute_s")


def per_score_costs(scores: pd.DataFrame, shape: Mapping | None, generator_shape: Mapping | None) -> pd.DataFrame:
    """Per (sample_id, condition): the cost columns (``COST_COLUMNS``); NaN where the run did not record them."""
    def col(name):
        return scores[name].astype(float) if name in scores else pd.Series(np.nan, index=scores.index)

    out = scores[["sample_id", "condition"]].copy()
    enc, prompt, answer, cache = col("encoded_tokens"), col("prompt_tokens"), col("n_answer_tokens"), col("cache_len")
    gen_prompt, gen = col("generation_prompt_tokens"), col("generated_tokens").fillna(0.0)
    gen_shared = col("generation_shared_tokens").fillna(0.0)
    decoded = col("generated_answer_tokens")  # NaN: the run decoded no answers
    out["index_tokens"], out["generated_tokens"] = enc, gen
    if shape:
        gshape = generator_shape or shape
        gen_f = [generation_flops(gshape, p, g, s) if g else 0.0
                 for p, g, s in zip(gen_prompt.fillna(0.0), gen, gen_shared, strict=True)]
        out["index_gflop"] = [(forward_flops(shape, e) if e == e else np.nan) / 1e9 for e in enc]
        out["index_gflop"] += np.asarray(gen_f) / 1e9
        out["query_gflop"] = [forward_flops(shape, p + a, c, a + 1) / 1e9
                              for p, a, c in zip(prompt, answer, cache, strict=True)]
        # The decoded answer continues the cache as a generation whose "shared" opening is the cache itself.
        out["answer_gflop"] = [generation_flops(shape, c + p, n, c) / 1e9 if n == n else np.nan
                               for p, n, c in zip(prompt, decoded, cache, strict=True)]
    else:
        out["index_gflop"] = out["query_gflop"] = out["answer_gflop"] = np.nan
    out["recompute_tokens"], out["recompute_gflop"], out["recompute_s"] = _recompute_costs(scores, col, shape)
    out["query_gflop"] += out["recompute_gflop"]
    out["index_s"] = col("encode_s") + col("generation_s").fillna(0.0)
    out["query_tokens"] = prompt + answer
    out["query_s"] = col("score_s") + out["recompute_s"]
    out["answer_tokens"], out["answer_s"] = decoded, col("answer_s")
    return out[["sample_id", "condition", *COST_COLUMNS]]


def _recompute_costs(scores: pd.DataFrame, col, shape):
    """(tokens recomputed, GFLOPs, seconds) of each row's selective recompute: 0 where it ran none (a condition
    without recompute, or a run from before recompute existed)."""
    tokens = col("recompute_tokens").fillna(0.0)
    token_layers = col("recompute_token_layers").fillna(0.0) + col("selection_token_layers").fillna(0.0)
    pairs = col("recompute_key_pairs").fillna(0.0)
    gflop = (pd.Series([recompute_flops(shape, t, p) / 1e9 for t, p in zip(token_layers, pairs, strict=True)],
                       index=scores.index)
             if shape else pd.Series(np.where(token_layers > 0, np.nan, 0.0), index=scores.index))
    return tokens, gflop, col("recompute_s").fillna(0.0)


def add_derived(costs: pd.DataFrame, derived_rules) -> pd.DataFrame:
    """A routed condition's cost: every cache it routes among is built for each document, and the query is
    scored against the one chosen (taken as the mean of the candidates' query costs)."""
    rows = [costs]
    for rule in derived_rules:
        part = costs[costs.condition.isin(rule["among"])]
        if part.empty:
            continue
        agg = part.groupby("sample_id", sort=False).agg(
            {**{c: "sum" for c in ("index_tokens", "generated_tokens", "index_gflop", "index_s")},
             **{c: "mean" for c in ("query_tokens", "query_gflop", "query_s", "answer_tokens", "answer_gflop",
                                    "answer_s", "recompute_tokens", "recompute_gflop", "recompute_s")}}).reset_index()
        agg["condition"] = rule["name"]
        rows.append(agg[costs.columns])
    return pd.concat(rows, ignore_index=True)


COST_TABLE_COLUMNS = ("test", "treatment", "reference", "mean_delta", "ci_low", "ci_high", "verdict", "index_tokens",
                      "generated_tokens", "extra_generated_tokens", "index_gflop", "extra_index_gflop", "extra_index_s",
                      "query_tokens", "query_gflop", "extra_query_gflop", "query_s", "extra_query_s",
                      "recompute_tokens", "recompute_gflop", "answer_tokens", "answer_gflop", "answer_s",
                      "delta_per_index_tflop")


def cost_table(costs: pd.DataFrame, tests: pd.DataFrame) -> pd.DataFrame:
    """One row per test (``tests``: name, treatment, reference, mean_delta, ci_low, ci_high, verdict): the
    benefit beside the treatment's extra cost per document over the reference, and the benefit per TFLOP."""
    mean = costs.groupby("condition", sort=False)[list(COST_COLUMNS)].mean()
    rows = []
    for t in tests.itertuples(index=False):
        trt = mean.loc[t.treatment] if t.treatment in mean.index else pd.Series(np.nan, index=COST_COLUMNS)
        ref = mean.loc[t.reference] if t.reference in mean.index else pd.Series(np.nan, index=COST_COLUMNS)
        extra = trt["index_gflop"] - ref["index_gflop"]
        rows.append({"test": t.name, "treatment": t.treatment, "reference": t.reference,
                     "mean_delta": t.mean_delta, "ci_low": t.ci_low, "ci_high": t.ci_high, "verdict": t.verdict,
                     "index_tokens": trt["index_tokens"], "generated_tokens": trt["generated_tokens"],
                     "extra_generated_tokens": trt["generated_tokens"] - ref["generated_tokens"],
                     "index_gflop": trt["index_gflop"], "extra_index_gflop": extra,
                     "extra_index_s": trt["index_s"] - ref["index_s"],
                     "query_tokens": trt["query_tokens"], "query_gflop": trt["query_gflop"],
                     "extra_query_gflop": trt["query_gflop"] - ref["query_gflop"],
                     "query_s": trt["query_s"], "extra_query_s": trt["query_s"] - ref["query_s"],
                     "recompute_tokens": trt["recompute_tokens"], "recompute_gflop": trt["recompute_gflop"],
                     "answer_tokens": trt["answer_tokens"], "answer_gflop": trt["answer_gflop"],
                     "answer_s": trt["answer_s"],
                     # nats of mean NLL gained per TFLOP of extra indexing work; undefined when it costs nothing more
                     "delta_per_index_tflop": t.mean_delta / (extra / 1e3) if extra > 0 else np.nan})
    return pd.DataFrame(rows, columns=COST_TABLE_COLUMNS)  # named even without a test (a baseline-only run)


def worth_it(table: pd.DataFrame, named: int = 0) -> list[str]:
    """A sentence per test whose treatment generates surrogates its reference does not: the walkthrough's
    question "is document-specific generation worth the compute?", answered with the run's numbers. ``named``:
    how many of the table's last rows are the experiment's named comparisons (its questions); only those are
    answered, or every test when none of them generates."""
    rows = list(table.itertuples(index=False))
    return _worth_it(rows[len(rows) - named:]) or _worth_it(rows) if named else _worth_it(rows)


def _worth_it(rows) -> list[str]:
    out = []
    for r in rows:
        # Only where the treatment generates what its reference does not (generated_other vs generated: both
        # pay for one generation per document, and their token counts differ only by the surrogates' lengths).
        if not (r.extra_generated_tokens > 0 and r.extra_index_gflop > 0):
            continue
        out.append(f"**{r.test}**: mean delta {r.mean_delta:+.4f} nats [{r.ci_low:+.4f}, {r.ci_high:+.4f}], verdict "
                   f"*{r.verdict}*, bought by {r.extra_index_gflop:.2f} GFLOP ({r.extra_index_s:.2f} s on this run's "
                   f"device) of extra indexing per document, {r.extra_generated_tokens:.0f} more tokens generated.")
    return out


def tests_frame(summary: pd.DataFrame, comparisons: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Every test of a run as (name, treatment, reference, mean_delta, ci_low, ci_high, verdict): each condition
    vs the baseline, then the named comparisons."""
    cols = ["name", "treatment", "reference", "mean_delta", "ci_low", "ci_high", "verdict"]
    vs = summary[~summary["is_baseline"].astype(bool)].assign(
        name=lambda d: d["condition"] + f" vs {baseline}", treatment=lambda d: d["condition"], reference=baseline)
    return pd.concat([vs[cols], comparisons[cols]], ignore_index=True) if len(comparisons) else vs[cols]
