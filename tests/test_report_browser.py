"""report.html of a small real run in headless Chromium (Debian's `chromium`, driven by Playwright from PyPI): no
console error, the tables and figures are there, a click on a column header reorders rows, the sample list filters
and sorts by a condition's delta, and a click on a sample shows its documents and each condition's surrogate.

Skipped, saying why, where Playwright or a Chromium binary is missing (`.ci/run` installs the browser). The
screenshots (the whole page, and the sample browser alone) go into the test's tmp folder, and also to
$KVPRIME_SCREENSHOT when that is set."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kvprime.files.results_io import read_jsonl
from kvprime.reporting import html

pytestmark = pytest.mark.browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _unavailable(reason: str):
    """Skip, saying why; a failure where the browser is required ($KVPRIME_REQUIRE_BROWSER: .ci/run installs it)."""
    if os.environ.get("KVPRIME_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (and $KVPRIME_REQUIRE_BROWSER is set)", pytrace=False)
    pytest.skip(reason)


def _chromium() -> str | None:
    """$KVPRIME_CHROMIUM when set (it must be an executable), else the first Chromium on PATH."""
    named = os.environ.get("KVPRIME_CHROMIUM")
    if named:
        if not (Path(named).is_file() and os.access(named, os.X_OK)):
            pytest.fail(f"$KVPRIME_CHROMIUM={named} is not an executable file; unset it to look on PATH",
                        pytrace=False)
        return named
    return next(filter(None, map(shutil.which, BROWSERS)), None)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        _unavailable("Playwright is not installed: pip install -e '.[dev]'")
    path = _chromium()
    if path is None:
        _unavailable(f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH and $KVPRIME_CHROMIUM); "
                     "`apt-get install -y chromium` installs it, as .ci/run does")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from test_report_html import tiny_run  # the same small run as the page's other tests

    return tiny_run(tmp_path_factory.mktemp("browser_run"))


@pytest.fixture()
def page(browser, run_dir):
    """report.html opened from file://, with every console error and uncaught exception collected."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto((run_dir / html.PAGE).as_uri())
    pg.wait_for_load_state("load")
    yield pg, errors
    pg.close()


def _column(pg, table, col: int) -> list[str]:
    return pg.eval_on_selector_all(f"#{table} tbody tr", f"rows => rows.map(r => r.cells[{col}].textContent)")


def test_the_page_loads_with_its_tables_and_figures_and_no_console_error(page, run_dir):
    pg, errors = page
    results = json.loads((run_dir / "results.json").read_text())
    assert pg.locator("#results-table tbody tr").count() == len(results["summary"])
    assert pg.locator("#comparisons-table tbody tr").count() == len(results["comparisons"]) == 5
    assert pg.locator("#costs-table tbody tr").count() == len(results["costs"])
    assert pg.locator("#results-table td.verdict-baseline").count() == 1
    # every figure decoded: a broken data: URI has no natural size
    sizes = pg.eval_on_selector_all("#figures img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) == len(results["figures"]) >= 2 and all(done and w > 100 for done, w in sizes)
    assert pg.locator("#sample-list tbody tr").count() == 4
    assert errors == []


def test_a_click_on_a_column_header_sorts_the_rows(page, run_dir):
    pg, errors = page
    summary = pd.read_csv(run_dir / "summary.csv")
    col = list(html.SUMMARY_ORDER).index("mean")
    header = pg.locator("#results-table thead th").nth(col)
    assert header.text_content() == "mean"
    header.click()
    assert _column(pg, "results-table", 0) == list(summary.sort_values("mean", kind="stable")["condition"])
    header.click()
    assert _column(pg, "results-table", 0) == list(summary.sort_values("mean", ascending=False,
                                                                       kind="stable")["condition"])
    assert errors == []


def test_the_sample_list_sorts_by_a_conditions_delta_and_filters(page, run_dir):
    pg, errors = page
    scores = read_jsonl(run_dir / "scores.jsonl")
    base = {r["sample_id"]: r["nll"] for r in scores if r["condition"] == "bare"}
    delta = {r["sample_id"]: base[r["sample_id"]] - r["nll"] for r in scores if r["condition"] == "truncated_random"}
    pg.click("#sample-list thead th[data-condition='truncated_random']")  # one click: where it loses most first
    assert _column(pg, "sample-list", 1) == sorted(delta, key=delta.get)
    pg.click("#sample-list thead th[data-condition='truncated_random']")
    assert _column(pg, "sample-list", 1) == sorted(delta, key=delta.get, reverse=True)
    pg.fill("#sample-filter", "NANTES")  # case-insensitive; s2's document
    assert _column(pg, "sample-list", 1) == ["s2"] and pg.text_content("#sample-count") == "1 of 4 samples"
    pg.fill("#sample-filter", "tower lille")  # every word, anywhere: s3's document has both, apart
    assert _column(pg, "sample-list", 1) == ["s3"]
    pg.fill("#sample-filter", "")
    assert pg.locator("#sample-list tbody tr").count() == 4
    assert errors == []


def test_a_click_on_a_sample_shows_its_document_and_surrogates(page, run_dir, tmp_path):
    pg, errors = page
    inputs = {r["sample_id"]: r for r in read_jsonl(run_dir / "inputs.jsonl")}
    scores = [r for r in read_jsonl(run_dir / "scores.jsonl") if r["sample_id"] == "s1"]
    pg.click("#sample-list tbody tr[data-id='s1']")
    assert pg.get_attribute("#sample-detail", "data-id") == "s1"
    # the document holding <script> and <img> shows as text, and none of it ran
    assert pg.locator("#sample-detail .doc").all_text_contents() == [inputs["s1"]["passage"]]
    assert pg.evaluate("window.kvprimeInjected") is None
    rows = pg.eval_on_selector_all("#sample-conditions tbody tr",
                                   "rows => rows.map(r => [r.dataset.condition, r.cells[1].textContent])")
    assert rows == [[r["condition"], r["surrogate"] or ""] for r in scores]
    assert "Where does river 1 flow?" in pg.text_content("#sample-detail")
    # per-token answer NLL: one coloured cell per answer token and condition
    assert pg.locator("#sample-detail .tok").count() == sum(r["n_answer_tokens"] for r in scores)
    assert errors == []
    shots = {"report.png": pg.screenshot(full_page=True), "samples.png": pg.locator("#samples").screenshot()}
    for name, png in shots.items():
        (tmp_path / name).write_bytes(png)
        assert len(png) > 10_000
    if os.environ.get("KVPRIME_SCREENSHOT"):  # the whole page there, the sample browser beside it as <name>-samples
        copy = Path(os.environ["KVPRIME_SCREENSHOT"])
        copy.write_bytes(shots["report.png"])
        copy.with_name(f"{copy.stem}-samples{copy.suffix}").write_bytes(shots["samples.png"])


def test_the_sweep_page_sorts_and_its_links_open_each_jobs_page(browser, run_dir, tmp_path):
    from test_report_html import _job

    from kvprime.scaleout.sweep import sweep_report

    sweep = tmp_path / "sweep"
    for n in (0, 1):
        _job(sweep, n, run_dir, [f"seed={n + 1}"])
    sweep_report(sweep)
    pg = browser.new_page()
    errors = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto((sweep / "sweep_report.html").as_uri())
    pg.click("#jobs-table thead th:has-text('seed')")
    pg.click("#jobs-table thead th:has-text('seed')")  # descending: job 1 (seed=2) first
    assert _column(pg, "jobs-table", 0) == ["1", "0"]
    pg.click("#jobs-table a:has-text('1')")
    pg.wait_for_load_state("load")
    assert pg.url == (sweep / "1" / html.PAGE).as_uri()
    assert pg.locator("#sample-list tbody tr").count() == 4
    assert errors == []
    pg.close()
