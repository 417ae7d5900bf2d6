"""Reporting: the markdown-table helper, the figure writer, the analysis registry, and finalize's determinism."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from kvprime.analysis.registry import (
    ANALYSES,
    AnalysisInput,
    AnalysisResult,
    FigureSpec,
    names_of,
    register_analysis,
    registered,
    run_analyses,
    unregister_analysis,
    validate_analyses,
)
from kvprime.errors import ConfigError
from kvprime.files import results_io
from kvprime.reporting.finalize import finalize
from kvprime.reporting.tables import cell, markdown_table

TABLES = ("summary.csv", "comparisons.csv", "scores.csv")


# ---------------------------------------------------------------- markdown tables
def test_cells_escape_pipes_and_newlines():
    assert cell("a|b") == "a\\|b"
    assert cell("line one\nline two\r\nthree") == "line one<br>line two<br>three"
    assert cell("{surrogate}\n") == "{surrogate}"  # a trailing newline is no line of its own
    t = markdown_table([{"name": "x|y", "text": "p\nq"}], ["name", "text"])
    assert t.splitlines() == ["| name | text |", "|---|---|", "| x\\|y | p<br>q |"]
    assert markdown_table([["a", 1]], ["col|umn", "n"]).splitlines()[0] == "| col\\|umn | n |"


@pytest.mark.parametrize("value", [None, float("nan"), np.nan, np.float32("nan"), pd.NA, pd.NaT])
def test_a_cell_that_does_not_apply_is_empty(value):
    assert cell(value) == ""


def test_number_formats_and_integer_columns():
    df = pd.DataFrame({"condition": ["full", "truncated"], "n": [8, 9], "mean": [6.17731, 0.0],
                       "p": [1.2e-5, float("nan")], "big": [123456.0, 1.5], "rope_fix": [None, "rerotate"]})
    lines = markdown_table(df, ["condition", "n", "mean", "p", "big", "rope_fix", "absent"]).splitlines()
    assert lines[0] == "| condition | n | mean | p | big | rope_fix |"  # an absent column is left out
    assert lines[2] == "| full | 8 | 6.1773 | 1.20e-05 | 1.23e+05 |  |"  # rope_fix of a full condition: empty
    assert lines[3] == "| truncated | 9 | 0.0000 |  | 1.5000 | rerotate |"
    # An all-numeric table keeps its integer column as integers (a row-wise walk would make them floats).
    assert markdown_table(pd.DataFrame({"n": [3], "x": [0.5]})).splitlines()[2] == "| 3 | 0.5000 |"


def test_formats_per_column_and_rows_as_sequences():
    t = markdown_table([[0, 0.99999912, 1.5e-7]], ["layer", "cos", "diff"], formats={"cos": ".6f", "diff": ".3e"})
    assert t.splitlines()[2] == "| 0 | 0.999999 | 1.500e-07 |"
    with pytest.raises(ValueError, match="column names"):
        markdown_table([[1, 2]])
    assert markdown_table(pd.DataFrame(columns=["a", "b"])) == "| a | b |\n|---|---|"


# ---------------------------------------------------------------- the figure writer
@pytest.mark.figures
def test_every_figure_goes_through_one_atomic_writer(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from kvprime.reporting import figures

    seen = []
    real = results_io.write_atomic
    monkeypatch.setattr(results_io, "write_atomic", lambda path, data: (seen.append(path), real(path, data)))
    fig = Figure(figsize=(4, 2))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    out = figures.save_figure(fig, tmp_path / "f.png")
    assert seen == [out] and [p.name for p in tmp_path.iterdir()] == ["f.png"]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (4 * figures.DPI,
                                                                                        2 * figures.DPI)
    assert b"Matplotlib version" not in data  # the bytes do not depend on the matplotlib release


# ---------------------------------------------------------------- the registry
@pytest.fixture()
def throwaway():
    """An analysis registered from outside kvprime (this test module), removed again afterwards."""
    name = "throwaway_gap"

    @register_analysis(name)
    def gap(run: AnalysisInput) -> AnalysisResult:
        """Mean NLL per condition and the gap to the baseline."""
        means = run.scores.groupby("condition", sort=False)["nll"].mean()
        table = pd.DataFrame({"condition": means.index, "mean_nll": means.to_numpy(),
                              "gap": means[run.baseline] - means.to_numpy(), "n_boot": run.n_boot, "seed": run.seed})

        def draw():
            from matplotlib.figure import Figure

            fig = Figure(figsize=(3, 2))
            fig.add_subplot(1, 1, 1).bar(range(len(means)), means.to_numpy())
            return fig

        return AnalysisResult({"gap_table": table}, titles={"gap_table": "Gap | to the baseline"},
                              figures={"gap": FigureSpec("gap.png", draw)})

    yield name
    unregister_analysis(name)


def test_unknown_analysis_names_the_registered_ones(throwaway):
    assert "exp01" in registered() and throwaway in registered()  # kvprime's own, found by pkgutil; and ours
    with pytest.raises(ConfigError, match=r"unknown analysis 'nope'.*Registered analyses: .*exp01.*throwaway_gap"):
        validate_analyses(["exp01", "nope"])
    assert validate_analyses("exp01") == ["exp01"] and validate_analyses(None) == []
    assert validate_analyses([throwaway, "exp01"]) == [throwaway, "exp01"]
    assert names_of("") == [] and names_of(["a", "a"]) == ["a"]
    with pytest.raises(ConfigError, match="an analysis name or a list of names"):
        names_of({"exp01": True})


def test_a_second_analysis_under_a_taken_name_is_refused(throwaway):
    with pytest.raises(ConfigError, match="registered twice"):
        register_analysis(throwaway)(lambda run: {})
    same = ANALYSES[throwaway].fn
    register_analysis(throwaway)(same)  # the same function imported again is not a second analysis


def test_run_analyses_merges_in_order_and_refuses_clashes(throwaway):
    scores = pd.DataFrame({"sample_id": ["a", "b", "a", "b"], "condition": ["x", "x", "y", "y"],
                           "nll": [1.0, 2.0, 0.5, 1.5], "similarity": [np.nan] * 4})
    run = AnalysisInput(scores=scores, similarity=None, baseline="x", seed=0, n_boot=1000, alpha=0.05,
                        confidence=0.95)
    out = run_analyses([throwaway], run)
    assert list(out.tables) == ["gap_table"] and out.titles == {"gap_table": "Gap | to the baseline"}
    assert out.tables["gap_table"]["gap"].tolist() == [0.0, 0.5] and list(out.figures) == ["gap"]
    for bad in ("../escape", "a/b", ""):
        register_analysis("throwaway_bad")(lambda run, bad=bad: {bad: pd.DataFrame()})
        try:
            with pytest.raises(ConfigError, match="not a plain file name"):
                run_analyses(["throwaway_bad"], run)
        finally:
            unregister_analysis("throwaway_bad")
    register_analysis("throwaway_twin")(lambda run: {"gap_table": pd.DataFrame()})
    try:
        with pytest.raises(ConfigError, match="both write the table 'gap_table'"):
            run_analyses([throwaway, "throwaway_twin"], run)
    finally:
        unregister_analysis("throwaway_twin")


# ---------------------------------------------------------------- finalize on a tiny run
@pytest.fixture()
def tiny_run(tiny_exp01_run):
    """conftest's exp01 run of the tiny random model (tests copy it before changing anything)."""
    return tiny_exp01_run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _set_config(run_dir, **exp):
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["experiment"].update(exp)
    (run_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.figures
def test_finalize_again_gives_the_same_bytes(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    names = [*TABLES, "results.json", "report.md", "conditions.png", "exp01_figure.png",
             *(f"analyses/{p.name}" for p in sorted((run / "analyses").iterdir()))]
    assert len(names) == len(TABLES) + 4 + 7  # exp01's seven tables
    before = {n: (run / n).read_bytes() for n in names}
    for n in names:
        (run / n).unlink()
    finalize(run)
    for n in names:
        assert (run / n).read_bytes() == before[n], n
    report = (run / "report.md").read_text()
    assert "| nan |" not in report and "## Critical test: does RoPE correction fix truncation?" in report


def test_a_registered_analysis_runs_through_finalize(tiny_run, tmp_path, throwaway):
    run = _copy(tiny_run, tmp_path)
    exp01_tables = {p.name: p.read_bytes() for p in (run / "analyses").iterdir()}
    _set_config(run, analyses=["exp01", throwaway])
    results = finalize(run)
    assert list(results["analyses"]) == ["critical", "surrogate_quality", "full_vs_truncated", "ordering",
                                         "similarity_correlation", "quartiles", "numerical_floor", "gap_table"]
    for name, data in exp01_tables.items():  # a second analysis changes nothing of the first
        assert (run / "analyses" / name).read_bytes() == data, name
    gap = pd.read_csv(run / "analyses" / "gap_table.csv")
    summary = pd.read_csv(run / "summary.csv").set_index("condition")
    assert list(gap["condition"]) == list(summary.index)
    assert np.allclose(gap.set_index("condition")["mean_nll"], summary["mean"])
    assert (gap["n_boot"] == 1000).all() and (gap["seed"] == results["metadata"]["seed"]).all()
    assert results["figures"]["gap"] == "gap.png" and (run / "gap.png").read_bytes()[:4] == b"\x89PNG"
    report = (run / "report.md").read_text()
    assert "## Gap \\| to the baseline" not in report  # headings are prose, not table cells
    assert "## Gap | to the baseline" in report and "![gap](gap.png)" in report


def test_an_analysis_from_a_plugin_file_serves_kvprime_report(tiny_run, tmp_path):
    """A researcher's module named in ``plugins:`` registers its analysis when finalize imports it."""
    plugin = tmp_path / "my_reporting_plugin.py"
    plugin.write_text(
        "import pandas as pd\n"
        "from kvprime.analysis.registry import register_analysis\n\n"
        "@register_analysis('plugin_counts')\n"
        "def counts(run):\n"
        "    return {'counts': run.scores.groupby('condition', sort=False).size().rename('n').reset_index()}\n")
    run = _copy(tiny_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["plugins"] = [str(plugin)]
    cfg["experiment"]["analyses"] = "plugin_counts"
    (run / "config.json").write_text(json.dumps(cfg))
    try:
        results = finalize(run)
        assert list(results["analyses"]) == ["counts"] and "exp01" not in results["figures"]
        assert pd.read_csv(run / "analyses" / "counts.csv")["n"].eq(4).all()
        assert "## counts" in (run / "report.md").read_text()  # no title given: the table's name
    finally:
        unregister_analysis("plugin_counts")


def test_an_unknown_analysis_stops_finalize_before_it_writes(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    _set_config(run, analyses=["exp01", "exp99"])
    stamp = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"'exp99'.*Registered analyses: .*exp01"):
        finalize(run)
    assert stamp == {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}


def test_finalize_and_report_name_no_experiment():
    """Analyses are found by name in the registry: the reporting code holds no experiment's name."""
    from pathlib import Path

    import kvprime

    root = Path(kvprime.__file__).parent
    for module in ("reporting/finalize.py", "reporting/report.py", "reporting/tables.py", "reporting/figures.py",
                   "scaleout/sweep.py"):
        text = (root / module).read_text()
        assert "exp01" not in text and "ANALYSIS_TITLES" not in text, module
