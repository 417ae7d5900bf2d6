"""The documentation site: `mkdocs build --strict` (what `make docs` runs) builds docs/ with no warning, so a broken
link or anchor, or a page left out of the nav, fails this test; the README, the front page, links only to pages and
headings that exist and stays short."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

pytestmark = pytest.mark.integration  # mkdocs builds the site in a process of its own

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def build(project: Path, out: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of ``project`` (a folder holding mkdocs.yml and docs/) into ``out``."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: `pip install -e '.[dev]'` installs it (make setup does)")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(project / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def project(tmp_path):
    """A copy of the site's sources, to break."""
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", copy / "docs")
    return copy


def test_the_site_builds_strictly(tmp_path):
    proc = build(ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    built = {p.stem for p in (tmp_path / "site").glob("*.html")}
    assert pages <= built, f"pages not built: {pages - built}"
    # Links between pages name the page's file, so the site works opened from file:// (no web server).
    assert 'href="statistics.html"' in (tmp_path / "site" / "index.html").read_text()


@pytest.mark.parametrize("breakage, named", [
    ("See [the missing page](no_such_page.md).", "no_such_page.md"),
    ("See [a heading that is not there](statistics.md#no-such-heading).", "no-such-heading"),
])
def test_a_broken_link_fails_the_build(project, tmp_path, breakage, named):
    page = project / "docs" / "concepts.md"
    page.write_text(page.read_text() + "\n" + breakage + "\n")
    proc = build(project, tmp_path / "site")
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr


def test_a_page_missing_from_the_nav_fails_the_build(project, tmp_path):
    (project / "docs" / "orphan.md").write_text("# Orphan\n\nIn no nav.\n")
    proc = build(project, tmp_path / "site")
    assert proc.returncode != 0 and "orphan.md" in proc.stderr, proc.stderr


def _anchors(page: Path) -> set[str]:
    """The heading anchors MkDocs gives ``page`` (its toc extension's slugify)."""
    text = FENCE.sub("", page.read_text())
    return {slugify(re.sub(r"[`*]", "", h), "-") for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _readme_link_problems(text: str) -> list[str]:
    problems = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path
        if not page.is_file():
            problems.append(f"{target}: no file {path}")
        elif anchor and page.suffix == ".md" and anchor not in _anchors(page):
            problems.append(f"{target}: {path} has no heading #{anchor}")
    return problems


def test_the_readme_links_to_pages_and_headings_that_exist():
    text = README.read_text()
    assert len(LINK.findall(text)) >= 10  # the front page links into the docs
    assert not _readme_link_problems(text)
    broken = text.replace("docs/multidoc.md#multi-document-contexts", "docs/multidoc.md#multi-document-context")
    assert _readme_link_problems(broken) == ["docs/multidoc.md#multi-document-context: docs/multidoc.md has no "
                                             "heading #multi-document-context"]


def test_the_readme_is_a_front_page_that_keeps_its_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) < 250
    # .ci/run and the first look at the project read these first lines: the main job and the test command.
    assert lines[:5] == ["# kvprime", "", "```bash",
                         "make run     # exp21 on the packaged SmolLM2-135M-Instruct + 50 SQuAD v1.1 dev samples "
                         "(CPU; ~1 min on 2 cores)",
                         "make test    # every test: tiny random models for the mechanics + a real SmolLM2 smoke run"]
