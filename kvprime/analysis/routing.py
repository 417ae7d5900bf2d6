"""Derived conditions: route each query to one of several primed caches, after scoring.

A derived condition picks, per sample, one of its ``among`` conditions and takes that score:
``max_similarity`` (the cache whose surrogate is most similar to the query: what a deployed router can
do), ``min_nll`` (the best cache by NLL: an oracle upper bound no router can beat), ``random`` (a
seeded control). Nothing is re-scored: routing reads ``scores.jsonl``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import ConfigError

PICKS = ("max_similarity", "min_nll", "random")
# The routers' choices are part of the derived-condition step, not a registered analysis: every run with
# derived conditions gets them, whichever analyses its experiment names.
CHOICES_TABLE = "routing_choices"
CHOICES_TITLE = "Routing: which cache each router chose"


def validate(rules: Sequence[Mapping], conditions: Sequence[str]) -> None:
    for rule in rules:
        if rule.get("pick") not in PICKS:
            raise ConfigError(f"derived condition {rule.get('name')!r}: pick={rule.get('pick')!r} is not known. "
                             f"Accepted: {', '.join(PICKS)}.")
        missing = [c for c in rule.get("among", []) if c not in conditions]
        if missing or not rule.get("among"):
            raise ConfigError(f"derived condition {rule.get('name')!r} routes among {rule.get('among')}, but "
                             f"{missing or 'nothing'} is not among the run's conditions ({', '.join(conditions)}).")


def derive(scores: pd.DataFrame, rules: Sequence[Mapping], *, seed: int) -> pd.DataFrame:
    """Rows (sample_id, condition, nll, routed_to, similarity) for every derived condition."""
    out = []
    for rule in rules:
        among = list(rule["among"])
        part = scores[scores.condition.isin(among)]
        for sample_id, group in part.groupby("sample_id", sort=False):
            if len(group) < len(among):
                continue  # routing needs every candidate cache of the sample
            group = group.set_index("condition").loc[among]
            if rule["pick"] == "max_similarity":
                sims = group["similarity"].astype(float)
                if sims.isna().all():
                    raise ConfigError(f"derived condition {rule['name']!r} routes by similarity, but the run has no "
                                     "similarities; set experiment.similarity=true.")
                chosen = sims.idxmax()  # ties: the first in `among` order
            elif rule["pick"] == "min_nll":
                nll = group["nll"].astype(float)
                chosen = nll.idxmin() if nll.notna().any() else among[0]
            else:
                rng = np.random.default_rng([seed, zlib.crc32(str(sample_id).encode()),
                                             zlib.crc32(rule["name"].encode())])
                chosen = among[int(rng.integers(len(among)))]
            row = group.loc[chosen]
            out.append({"sample_id": sample_id, "condition": rule["name"], "nll": row["nll"], "routed_to": chosen,
                        "similarity": row.get("similarity")})
    return pd.DataFrame(out, columns=["sample_id", "condition", "nll", "routed_to", "similarity"])


def routing_table(derived: pd.DataFrame) -> pd.DataFrame:
    """How often each derived condition chose each cache."""
    if derived.empty:
        return pd.DataFrame(columns=["condition", "routed_to", "n", "share"])
    counts = derived.groupby(["condition", "routed_to"], sort=False).size().rename("n").reset_index()
    counts["share"] = counts["n"] / counts.groupby("condition")["n"].transform("sum")
    return counts
