"""What a tracker logs of a finished run, read from the run directory's files alone (config.json and
results.json, whose summary and comparisons are the rows of summary.csv and comparisons.csv, written by
``kvprime.reporting.finalize``), so tracking needs nothing from the pipeline and logs the numbers the report shows:

- params: config.json flattened to dotted keys (``stats.alpha``, ``model.name``);
- metrics: per condition (``<condition>/mean_nll``, ``/mean_delta``, ``/ci_low``, ``/ci_high``, ``/p_holm`` and,
  where answers were decoded, ``/em``, ``/f1``, ``/contains`` and their deltas) and per named comparison
  (``comparison/<treatment> vs <reference>/...``); a value the run left empty (the baseline's delta) is not logged;
- tags: each condition's and comparison's verdict, each diagnosis check's status, the experiment and run directory;
- artifacts: report.html, report.md, the CSVs, the figures and config.json.

Keys keep the characters MLflow-like trackers accept (letters, digits, ``_ - . / :`` and spaces); any other
in a row become one ``_`` (none at the end).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MissingFileError

CONDITION_METRICS = {"mean": "mean_nll", "mean_delta": "mean_delta", "ci_low": "ci_low", "ci_high": "ci_high",
                     "p_holm": "p_holm", "em": "em", "f1": "f1", "contains": "contains", "em_delta": "em_delta",
                     "f1_delta": "f1_delta", "contains_delta": "contains_delta"}
COMPARISON_METRICS = ("mean_delta", "ci_low", "ci_high", "p_holm", "em_delta", "f1_delta", "contains_delta")
# The files logged as artifacts, relative to the run directory (figures are the run's PNGs).
ARTIFACT_PATTERNS = ("report.html", "report.md", "config.json", "*.csv", "*.png", "analyses/*.csv", "analyses/*.png")
# The run's files the record is read from; the last is finalize's completion record.
SOURCES = ("config.json", "results.json")


@dataclass
class RunRecord:
    run_dir: Path
    name: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # relative to run_dir


def key(text: str) -> str:
    return re.sub(r"[^\w\-. :/]+", "_", str(text)).rstrip("_ ")


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def flatten(cfg, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Dotted keys and their values as text (lists as JSON, null as ``null``)."""
    for name, value in cfg.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{dotted}.")
        elif isinstance(value, str):
            yield key(dotted), value
        else:
            yield key(dotted), json.dumps(value)


def _text(value) -> bool:
    """A non-empty string (results.json writes a missing cell as null)."""
    return isinstance(value, str) and bool(value)


def _condition_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for row in rows:
        for column, name in CONDITION_METRICS.items():
            value = _number(row.get(column))
            if value is not None:
                out[key(f"{row['condition']}/{name}")] = value
    return out


def comparison_key(row: Mapping) -> str:
    return key(f"comparison/{row['treatment']} vs {row['reference']}")


def _comparison_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for row in rows:
        for column in COMPARISON_METRICS:
            value = _number(row.get(column))
            if value is not None:
                out[f"{comparison_key(row)}/{column}"] = value
    return out


def _tags(run_dir: Path, summary: list[dict], comparisons: list[dict], results: Mapping) -> dict[str, str]:
    tags = {"kvprime.run_dir": str(run_dir.resolve()), "kvprime.experiment": str(results["experiment"]["name"]),
            "kvprime.baseline": str(results["experiment"].get("baseline"))}
    tags.update({key(f"verdict/{r['condition']}"): r["verdict"] for r in summary if _text(r.get("verdict"))})
    for r in comparisons:
        tags[f"{comparison_key(r)}/name"] = r["name"]
        if _text(r.get("verdict")):
            tags[f"{comparison_key(r)}/verdict"] = r["verdict"]
    for d in results.get("diagnosis") or []:
        tags[key(f"diagnosis/{d['check']}")] = f"{d['status']}: {d['text']}"
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        tags["kvprime.overrides"] = overrides.read_text()
    return tags


def _artifacts(run_dir: Path) -> list[Path]:
    found = {p.relative_to(run_dir) for pattern in ARTIFACT_PATTERNS for p in run_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def read_run(run_dir) -> RunRecord:
    """The record of the finished run in ``run_dir`` (refused, naming the file, where one is missing)."""
    run_dir = Path(run_dir)
    for name in SOURCES:
        if not (run_dir / name).is_file():
            raise MissingFileError(f"{run_dir / name} is missing, so the run cannot be logged to the tracker: a run "
                                   "writes it when it finishes; `kvprime report <run_dir>` rebuilds the tables.")
    config = json.loads((run_dir / "config.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    summary, comparisons = results["summary"], results["comparisons"]
    return RunRecord(run_dir=run_dir, name=run_dir.name, params=dict(flatten(config)),
                     metrics={**_condition_metrics(summary), **_comparison_metrics(comparisons)},
                     tags=_tags(run_dir, summary, comparisons, results), artifacts=_artifacts(run_dir))
