"""report.html and sweep_report.html without a browser: one self-contained file (nothing loaded from outside,
figures as data: URIs), rebuilt byte for byte by `kvprime report`, holding every sample and condition with the
run's numbers, HTML in the data shown as text, and the sweep's page linking to each job's page."""

import base64
import fnmatch
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures.jsonl import write_jsonl
from typer.testing import CliRunner

from kvprime.commands.cli import app
from kvprime.files.results_io import read_jsonl
from kvprime.reporting import html
from kvprime.scaleout.sweep import sweep_report

# A document that would run script, load an image and close the data block if it were pasted in as markup.
HOSTILE = ('</script><script>window.kvprimeInjected = 1</script><img src="https://example.com/x.png" '
           'onerror="window.kvprimeInjected = 2"> The river flows into the sea near the old tower of the city.')
CITIES = ("Paris", "Lyon", "Nantes", "Lille")


def tiny_run(root):
    """exp21 of the tiny random model on 4 samples (one document holding HTML), answers decoded and per-token
    log-probabilities saved, run in-process as conftest's tiny_exp01_run is."""
    from kvprime.config.compose import compose
    from kvprime.pipeline import runner

    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city of {city} and into the sea "
                                       f"near the tower {i}. Boats carry grain along it.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}",
             "answers": [f"into the sea {i}", f"the sea {i}"]} for i, city in enumerate(CITIES)]
    rows[1]["passage"] = HOSTILE
    data = root / "samples.jsonl"
    write_jsonl(data, rows)
    cfg = compose(["experiment=exp21", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data}",
                   "stats.n_boot=1000", "progress=false", "per_token=true", "metrics=[nll,answer]",
                   "answer.max_new_tokens=4"])
    runner.run_experiment(cfg, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("html_run"))


class Page(HTMLParser):
    """Every tag with its attributes, and the text of each <script> by its type."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.scripts, self._in = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in = dict(attrs).get("type", "text/javascript")
            self.scripts.append([self._in, ""])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self.scripts[-1][1] += data


def page_data(run_dir) -> dict:
    page = Page((run_dir / html.PAGE).read_text())
    [(_, text)] = [s for s in page.scripts if s[0] == "application/json"]
    return json.loads(text)


def test_the_page_is_self_contained(run_dir):
    page = Page((run_dir / html.PAGE).read_text())
    results = json.loads((run_dir / "results.json").read_text())
    refs = [(tag, k, v) for tag, attrs in page.tags for k, v in attrs.items() if k in ("src", "href", "action")]
    assert not [r for r in refs if re.match(r"\s*(https?:)?//", r[2], re.I)], refs
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == len(results["figures"]) >= 2
    for name, src in zip(results["figures"].values(), images, strict=True):
        assert src == "data:image/png;base64," + base64.b64encode((run_dir / name).read_bytes()).decode()
    assert not [t for t, a in page.tags if t in ("link", "iframe", "object", "embed")]
    assert all("src" not in a for t, a in page.tags if t == "script")  # every script is inline
    assert [s[0] for s in page.scripts] == ["application/json", "text/javascript", "text/javascript"]
    assert sum(len(s[1]) for s in page.scripts[1:]) < 20_000  # the inlined script stays small


@pytest.mark.figures
def test_kvprime_report_rebuilds_the_page_byte_for_byte(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    written_by_the_run = (run / html.PAGE).read_bytes()
    (run / html.PAGE).unlink()
    pages = []
    for _ in range(2):
        said = CliRunner().invoke(app, ["report", str(run)])
        assert said.exit_code == 0, said.output
        pages.append((run / html.PAGE).read_bytes())
    assert pages[0] == pages[1] == written_by_the_run


def test_the_page_holds_every_sample_and_condition_with_the_runs_numbers(run_dir):
    data = page_data(run_dir)
    inputs = read_jsonl(run_dir / "inputs.jsonl")
    plan = json.loads((run_dir / "plan.json").read_text())
    scores = read_jsonl(run_dir / "scores.jsonl")
    assert data["baseline"] == "bare" and data["conditions"] == list(plan["conditions"])
    assert [s["id"] for s in data["samples"]] == [r["sample_id"] for r in inputs]
    base = {r["sample_id"]: r["nll"] for r in scores if r["condition"] == "bare"}
    texts = data["texts"]
    by_id = {s["id"]: s for s in data["samples"]}
    for r in scores:
        s = by_id[r["sample_id"]]
        e = s["scores"][r["condition"]]
        assert e["nll"] == pytest.approx(r["nll"], rel=1e-6)
        assert e["delta"] == pytest.approx(base[r["sample_id"]] - r["nll"], abs=1e-6)
        assert (texts[e["surrogate"]] if "surrogate" in e else None) == r["surrogate"]
        assert e["answer"] == r["generated_answer"] and (e["em"], e["f1"], e["contains"]) == \
            (r["exact_match"], r["f1"], r["contains"])
        assert e["token_nll"] == pytest.approx([-x for x in r["token_logprobs"]], rel=1e-3)
    for r in inputs:
        s = by_id[r["sample_id"]]
        assert [texts[d] for d in s["docs"]] == [r["passage"]] and "gold" not in s
        assert (s["query"], s["answer"], s["answers"]) == (r["query"], r["answer"], [f"the sea {r['sample_id'][1:]}"])
    # each distinct text once: 4 documents and the distinct surrogates
    assert len(texts) == len(set(texts)) == 4 + len({r["surrogate"] for r in scores if r["surrogate"]})


def test_the_tables_colour_verdicts_and_sort_by_raw_values(run_dir):
    page = (run_dir / html.PAGE).read_text()
    summary = pd.read_csv(run_dir / "summary.csv")
    table = page[page.index('id="results-table"'):]
    table = table[:table.index("</table>")]
    header, *rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    # report.md's columns, the verdict moved up beside the condition so it is in view without scrolling sideways
    assert re.findall(r"<th[^>]*>(.*?)</th>", header)[:3] == ["condition", "verdict", "n"]
    assert len(rows) == len(summary)
    for row, (_, s) in zip(rows, summary.iterrows(), strict=True):
        assert f'class="verdict-{s["verdict"]}"' in row
        assert f'data-sort="{float(s["mean"])!r}"' in row  # full precision, not the 4 decimals shown


def test_html_in_a_document_is_text_not_markup(run_dir):
    text = (run_dir / html.PAGE).read_text()
    assert "kvprimeInjected" in text  # the document is in the page...
    assert "<script>window.kvprimeInjected" not in text and "<img src=\"https://example.com" not in text
    assert text.count("</script>") == 3  # ...and cannot close the data block: only the page's own scripts end
    assert HOSTILE in [page_data(run_dir)["texts"][i] for i in range(4)]


def test_sample_data_marks_the_gold_document_and_stores_each_text_once():
    inputs = [{"sample_id": f"q{i}", "passage": f"gold {i}", "gold_slot": i, "query": f"question {i}", "answer": "a",
               "passages": [f"gold {i}", "shared distractor"][::1 - 2 * i], "answers": ["a"]} for i in range(2)]
    scores = pd.DataFrame([{"sample_id": f"q{i}", "condition": c, "nll": 1.0 + i + j, "surrogate": "same text",
                            "similarity": np.nan} for i in range(2) for j, c in enumerate(["base", "x"])])
    derived = pd.DataFrame([{"sample_id": "q1", "condition": "routed", "nll": 1.5, "routed_to": "x",
                             "similarity": np.nan}])
    data = html.sample_data(inputs, scores, derived, baseline="base", conditions=["base", "x", "routed"],
                            skipped=[{"sample_id": "q0", "reason": "too long"}])
    texts = data["texts"]
    assert sorted(texts) == ["gold 0", "gold 1", "same text", "shared distractor"]
    q0, q1 = data["samples"]
    assert [texts[d] for d in q0["docs"]] == ["gold 0", "shared distractor"] and q0["gold"] == 0
    assert [texts[d] for d in q1["docs"]] == ["shared distractor", "gold 1"] and q1["gold"] == 1
    assert q0["skipped"] == "too long" and "skipped" not in q1
    assert q1["scores"]["routed"] == {"nll": 1.5, "delta": 0.5, "routed_to": "x"}
    assert q1["scores"]["x"]["delta"] == -1.0 and "similarity" not in q1["scores"]["x"]  # NaN: left out


@pytest.mark.parametrize("value, text, sort", [(None, "", ""), (float("nan"), "", ""), (3, "3", "3"),
                                               (0.123456789, "0.1235", "0.123456789"), (2e-7, "2.00e-07", "2e-07"),
                                               (True, "True", "True"), ("a<b", "a<b", "a<b")])
def test_cells_show_what_report_md_shows_and_sort_by_the_value(value, text, sort):
    c = html.cell(value)
    assert (c["text"], c["sort"]) == (text, sort)


def _job(sweep, n, run_dir, overrides):
    d = sweep / str(n)
    if run_dir is not None:
        shutil.copytree(run_dir, d)
    (d / ".hydra").mkdir(parents=True, exist_ok=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return d


def test_the_sweep_page_links_each_jobs_page(run_dir, tmp_path):
    sweep = tmp_path / "sweep"
    for n in (0, 1):
        _job(sweep, n, run_dir, [f"seed={n + 1}", "experiment=exp21"])
    failed = _job(sweep, 2, None, ["seed=3", "experiment=exp21"])
    (failed / "error.json").write_text(json.dumps({"type": "ConfigError", "message": "bad <value>"}))
    report = sweep_report(sweep)
    assert report["files"]["page"] == "sweep_report.html"
    text = (sweep / "sweep_report.html").read_text()
    page = Page(text)
    links = [a["href"] for t, a in page.tags if t == "a" and "href" in a]
    assert links == ["0/report.html", "1/report.html"]  # the failed job has no page to link to
    assert all((sweep / link).resolve() == (sweep / link[0] / "report.html").resolve() and (sweep / link).is_file()
               for link in links)
    assert not [a for t, a in page.tags if t == "img" and not a["src"].startswith("data:image/png;base64,")]
    assert "bad &lt;value&gt;" in text and "verdict-failed" in text and text.count('class="verdict-complete"') == 2
    assert '<td data-sort="seed=2 experiment=exp21">seed=2 experiment=exp21</td>' in text  # the job's overrides
    untouched = text[text.index('id="untouched-table"'):]
    assert report["untouched_conditions"] and \
        untouched[:untouched.index("</table>")].count("<tr>") == len(report["untouched_conditions"]) + 1
    summary = pd.read_csv(run_dir / "summary.csv")
    delta = float(summary.set_index("condition").loc["truncated_oracle", "mean_delta"])
    assert f'data-sort="{delta!r}"' in text
    before = text
    sweep_report(sweep)
    assert (sweep / "sweep_report.html").read_text() == before


def test_the_page_carries_report_mds_cache_check_definitions_and_answer_endings(run_dir):
    text = (run_dir / html.PAGE).read_text()
    inspect = json.loads((run_dir / "inspect.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    for table_id, n in (("cache-shapes-table", len(inspect["conditions"])), ("cache-layers-table",
                                                                            len(inspect["layers"])),
                        ("answer-stops-table", len(results["answer_quality"]["stops"]))):
        body = text[text.index(f'id="{table_id}"'):]
        assert body[:body.index("</table>")].count("<tr>") == n + 1, table_id  # the header row and one per item
    assert f"Sample <code>{inspect['sample_id']}</code>" in text
    assert "<li><strong>NLL</strong>: mean natural-log negative log-likelihood" in text
    assert f"at most {results['answer_quality']['max_new_tokens']} new\ntokens" in text


@pytest.mark.parametrize("text, markup", [
    ("**d_z**: `p_holm` < *alpha*", "<strong>d_z</strong>: <code>p_holm</code> &lt; <em>alpha</em>"),
    ("<b>x</b> `<i>` a*b*c 2 * 3 * 4", "&lt;b&gt;x&lt;/b&gt; <code>&lt;i&gt;</code> a*b*c 2 * 3 * 4"),
])
def test_report_mds_inline_marks_become_tags_and_everything_else_is_escaped(text, markup):
    assert html.inline_markdown(text) == markup


def test_the_templates_ship_in_the_wheel():
    """pyproject.toml's package-data patterns for kvprime.reporting cover every template file (without them an
    installed kvprime cannot write report.html; tests/test_wheel.py builds and runs the wheel)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    repo = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = patterns.get("kvprime.reporting", [])
    package = repo / "kvprime" / "reporting"
    files = [p.relative_to(package).as_posix() for p in (package / "templates").rglob("*") if p.is_file()]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
