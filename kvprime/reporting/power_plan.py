"""``kvprime power``: from a finished (pilot) run, the samples a planned run needs per comparison.

It reads ``summary.csv`` and ``comparisons.csv`` (the observed sd of each test's paired deltas, its n and its
MDE) and ``config.json`` (alpha, power, equivalence margin, unless overridden), and asks
``kvprime.analysis.power`` how many samples detect ``effect`` nats and how many show equivalence within the
margin. Nothing is written: the run directory is only read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..analysis import power as pw
from ..config import settings
from ..errors import ConfigError, MissingFileError

COLUMNS = ("test", "treatment", "reference", "n", "std_delta", "mean_delta", "mde", "n_to_detect",
           "n_for_equivalence")


def _read(run_dir: Path, name: str) -> pd.DataFrame:
    path = run_dir / name
    if not path.exists():
        raise MissingFileError(f"{run_dir} is not a finished kvprime run directory: {name} is missing "
                               "(`kvprime report <run_dir>` writes it from a finished run's scores).")
    return pd.read_csv(path)


def plan(run_dir, *, effect: float, power: float | None = None, alpha: float | None = None,
         margin: float | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per test of the run (each condition vs the baseline, then each named comparison), and the
    settings used (alpha, power, margin, effect)."""
    run_dir = Path(run_dir)
    if not (isinstance(effect, (int, float)) and effect > 0):
        raise ConfigError(f"--effect={effect!r} is not accepted: it is the mean NLL delta (nats) the planned run "
                          "should detect. Accepted: a number > 0, e.g. 0.02.")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise MissingFileError(f"{run_dir} is not a kvprime run directory: config.json is missing.")
    st = settings.check(json.loads(cfg_path.read_text()), only=("stats",), origin=str(cfg_path))["stats"]
    given = {"alpha": alpha, "power": power}
    for key, value in given.items():
        if value is not None and not settings.OPEN_UNIT.ok(value):
            raise ConfigError(f"--{key}={value!r} is not accepted. Accepted: a number strictly between 0 and 1.")
    if margin is not None and not (isinstance(margin, (int, float)) and margin > 0):
        raise ConfigError(f"--margin={margin!r} is not accepted: it is the equivalence margin in nats. Accepted: "
                          "a number > 0.")
    used = {"alpha": alpha if alpha is not None else st["alpha"], "power": power if power is not None else st["power"],
            "margin": margin if margin is not None else st["equivalence_margin"], "effect": float(effect)}
    summary, comparisons = _read(run_dir, "summary.csv"), _read(run_dir, "comparisons.csv")
    if "std_delta" not in summary.columns:
        raise MissingFileError(f"{run_dir}/summary.csv has no std_delta column; rebuild it with "
                               "`kvprime report <run_dir>`.")
    base = summary[~summary["is_baseline"].astype(bool)]
    tests = [(f"{r.condition} vs {b}", r.condition, b, r.n_pairs, r.std_delta, r.mean_delta)
             for b in summary.loc[summary["is_baseline"].astype(bool), "condition"] for r in base.itertuples()]
    tests += [(r.name, r.treatment, r.reference, r.n, r.std_delta, r.mean_delta) for r in comparisons.itertuples()]
    rows = []
    for name, treatment, reference, n, sd, mean in tests:
        n = int(n) if pd.notna(n) else 0
        rows.append({"test": name, "treatment": treatment, "reference": reference, "n": n, "std_delta": sd,
                     "mean_delta": mean, "mde": pw.mde(sd, n, alpha=used["alpha"], power=used["power"]),
                     "n_to_detect": pw.n_to_detect(sd, effect, alpha=used["alpha"], power=used["power"]),
                     "n_for_equivalence": pw.n_for_equivalence(sd, used["margin"], alpha=used["alpha"],
                                                                power=used["power"])})
    return pd.DataFrame(rows, columns=COLUMNS), used
