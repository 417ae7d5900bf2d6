"""The analysis registry: an analysis is one module that registers itself by name; experiments name it.

An experiment lists its analyses by name (``experiment.analyses: exp01`` or a list of names). After scoring,
``kvprime.reporting.finalize`` looks each name up here and calls it with the run's scores (``AnalysisInput``); it
returns named tables, their titles for the report and, optionally, figures (``AnalysisResult``). finalize
writes the tables to ``analyses/<table>.csv``, the figures beside ``report.md``, and the report shows them.

::

    from kvprime.analysis.registry import AnalysisInput, AnalysisResult, register_analysis

    @register_analysis("my_gap")
    def my_gap(run: AnalysisInput) -> AnalysisResult:
        \"\"\"One line that `kvprime conditions` can show.\"\"\"
        w = run.scores.pivot(index="sample_id", columns="condition", values="nll")
        table = pd.DataFrame({"gap": [(w[run.baseline] - w["primed"]).mean()]})
        return AnalysisResult({"my_gap": table}, titles={"my_gap": "Primed vs baseline"})

kvprime's own analyses are the modules of ``kvprime.analysis``, found by ``pkgutil`` when the registry is first read
(``kvprime.registry``); a researcher's analyses are modules named in the run's ``plugins:`` list
(``kvprime.config.plugins``) or ``kvprime.plugins`` entry points, which register theirs when imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:  # for annotations only: analyses import matplotlib when they draw, not before
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class AnalysisInput:
    """What an analysis gets: the run's scores and the settings its statistics must follow."""

    # sample_id, condition, nll (NaN: non-finite), similarity; run order. With metrics [nll, answer] also
    # exact_match, f1 and contains (1/0 per answer).
    scores: pd.DataFrame
    similarity: pd.Series | None  # per sample_id: experiment.similarity_condition's surrogate-query cosine
    baseline: str
    seed: int  # the run's seed; derive per-test seeds from it (stats._derive_seed) as summary.csv does
    n_boot: int
    alpha: float
    confidence: float
    experiment: Mapping = field(default_factory=dict)  # the run's experiment config: an analysis may read keys
    derived: pd.DataFrame | None = None  # routed rows (routing.derive) when the experiment has derived conditions
    # stats.paired_test's keywords as the run resolved them (tie tolerance: stats.tie_tolerance or the floor)
    tie_tolerance: float = 0.0
    equivalence_margin: float = 0.02
    power: float = 0.8
    # The run's samples as inputs.jsonl records them (kvprime.data.types.Sample.to_dict: gold_slot(s), task_info),
    # in run order. A run's are read from the file on each pass (files.results_io.JsonlRecords): iterate them.
    inputs: Sequence[Mapping] = ()


@dataclass(frozen=True)
class FigureSpec:
    """A figure an analysis offers: its file name in the run directory and a function that draws it.

    Drawn only after the tables, and skipped when matplotlib cannot be imported (figures are optional
    output; tables are not). kvprime saves it (``kvprime.reporting.figures.save_figure``: one format and dpi)."""

    file: str
    draw: Callable[[], Figure]


@dataclass
class AnalysisResult:
    tables: dict[str, pd.DataFrame]  # table name -> table; written as analyses/<name>.csv, in this order
    titles: dict[str, str] = field(default_factory=dict)  # table name -> report heading (default: the name)
    figures: dict[str, FigureSpec] = field(default_factory=dict)  # key in results.json -> figure


@dataclass(frozen=True)
class AnalysisInfo:
    name: str
    fn: Callable[[AnalysisInput], AnalysisResult | Mapping[str, pd.DataFrame]]
    doc: str = ""


ANALYSES: Registry[AnalysisInfo] = Registry(
    "analysis", packages=(__package__,), plural="analyses",
    hint="A plugin module registers its own with @register_analysis; name it in plugins: [...].")


def register_analysis(name: str):
    """Decorator: ``fn(AnalysisInput) -> AnalysisResult`` (or a plain ``{table name: DataFrame}``)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"an analysis needs a non-empty name, got {name!r}.")

    def wrap(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if (fn.__doc__ or "").strip() else ""
        ANALYSES.register(name, AnalysisInfo(name, fn, doc), origin=fn)
        return fn
    return wrap


def unregister_analysis(name: str) -> None:
    """Remove an analysis (tests that register throwaway ones clean up with it)."""
    ANALYSES.unregister(name)


def registered() -> list[str]:
    return ANALYSES.names()


def names_of(value) -> list[str]:
    """``experiment.analyses`` as a list: absent/None -> [], a name -> [name], a list of names -> the list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.strip() for v in value):
        return list(dict.fromkeys(value))
    raise ConfigError(f"experiment.analyses={value!r} is not accepted. Accepted: an analysis name or a list of "
                      f"names; registered: {', '.join(registered()) or 'none'}.")


def validate_analyses(names) -> list[str]:
    """Check ``experiment.analyses`` (a name, a list of names or None) against the registry, before any model
    loads; return the names. Plugins must be imported first: they register their analyses as they import."""
    wanted = names_of(names)
    unknown = [n for n in wanted if n not in ANALYSES]
    if unknown:
        raise ConfigError(f"experiment.analyses: unknown analysis {', '.join(map(repr, unknown))}. Registered "
                          f"analyses: {', '.join(registered()) or 'none'} (a plugin module registers its own with "
                          "@register_analysis; name it in plugins: [...]).")
    return wanted


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name))


def run_analyses(names, run: AnalysisInput) -> AnalysisResult:
    """Every named analysis, in order, merged into one result; two analyses may not write the same table."""
    merged = AnalysisResult({})
    owner: dict[str, str] = {}
    for name in validate_analyses(names):
        out = ANALYSES.get(name).fn(run)
        if not isinstance(out, AnalysisResult):
            out = AnalysisResult(dict(out))
        for table, frame in out.tables.items():
            if not _plain_name(table):
                raise ConfigError(f"analysis {name!r}: table name {table!r} is not a plain file name (letters, "
                                  "digits, _ . -): it becomes analyses/<name>.csv.")
            if not isinstance(frame, pd.DataFrame):
                raise TypeError(f"analysis {name!r}: table {table!r} is a {type(frame).__name__}, not a DataFrame")
            if table in owner:
                raise ConfigError(f"experiment.analyses: {owner[table]!r} and {name!r} both write the table "
                                  f"{table!r}; run one of them.")
            owner[table] = name
            merged.tables[table] = frame
            merged.titles[table] = out.titles.get(table, table)
        for key, fig in out.figures.items():
            if not (isinstance(fig, FigureSpec) and _plain_name(fig.file) and fig.file.endswith(".png")):
                raise ConfigError(f"analysis {name!r}: figure {key!r} must be a FigureSpec whose file is a plain "
                                  f"PNG file name in the run directory, got {fig!r}.")
            if key in merged.figures:
                raise ConfigError(f"experiment.analyses: two analyses draw the figure {key!r}; run one of them.")
            merged.figures[key] = fig
    return merged
