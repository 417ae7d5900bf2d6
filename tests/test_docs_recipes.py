"""The four recipes of docs/extending.md (a builder, a surrogate source, an analysis, a dataset loader), run exactly
as printed: every file block the page heads with `<!-- example: <path> -->` is written into a folder outside the
repository, and each recipe's command (the bash block after `<!-- command: <recipe> -->`) runs there as the
`kvprime` console script runs it, with only settings that make it small added (the tiny random model, a one-sample
dataset where the recipe brings no data, fewer bootstrap draws, the run directory). No edit to kvprime is made."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from fixtures import cli

pytestmark = pytest.mark.integration  # each recipe runs as the console script, in a process of its own

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "extending.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", flags=re.S)
COMMAND = re.compile(r"<!-- command: (\S+) -->\n```bash\n(.*?)```", flags=re.S)
SMALL = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false"]
ONE_SAMPLE = ["dataset=exp21_sanity"]  # "What is the capital of France?"


def examples(text: str) -> dict[str, str]:
    return dict(EXAMPLE.findall(text))


def commands(text: str) -> dict[str, list[str]]:
    """Each recipe's command as argv; a recipe shows exactly one."""
    found = {}
    for name, body in COMMAND.findall(text):
        lines = [line for line in body.splitlines() if line.strip()]
        assert len(lines) == 1, f"recipe {name!r} shows {len(lines)} commands"
        found[name] = shlex.split(lines[0], comments=True)
    return found


def write_study(root: Path, text: str) -> Path:
    for rel, body in examples(text).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body)
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = write_study(tmp_path_factory.mktemp("outside"), PAGE.read_text())
    assert not str(root.resolve()).startswith(str(ROOT))
    return root


def run_shown(recipe: str, study: Path, run_dir: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """The recipe's printed command, run from ``study`` as the console script runs it (the current directory is not
    on sys.path: a plugin is found by kvprime's own search, beside --config-dir), plus ``extra`` settings."""
    argv = commands(PAGE.read_text())[recipe]
    assert argv[:2] == ["kvprime", "run"], argv
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(run_dir.parent / "out"), "HF_HUB_OFFLINE": "1"}
    return cli.run([*argv[1:], *SMALL, *extra, f"hydra.run.dir={run_dir}"], env=env, cwd=study, timeout=600)


def inputs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "inputs.jsonl").read_text().splitlines()]


def test_the_page_shows_four_recipes_each_with_its_files():
    text = PAGE.read_text()
    assert set(commands(text)) == {"builder", "source", "analysis", "loader"}
    assert {"my_study/masked_prefix.py", "my_study/condition/masked_surrogate.yaml", "my_study/shouted.py",
            "my_study/condition/shouted_primed.yaml", "my_study/primed_gap.py", "my_study/experiment/gap_study.yaml",
            "my_study/csv_qa.py", "my_study/dataset/csv_qa.yaml", "my_study/qa.csv"} <= set(examples(text))


def test_builder_recipe(study, tmp_path):
    proc = run_shown("builder", study, tmp_path / "run", ONE_SAMPLE)
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(tmp_path / "run" / "summary.csv").set_index("condition")
    assert summary.loc["masked_surrogate", "n"] == 1
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["conditions"]["masked_surrogate"]["builder"] == "masked_prefix"


def test_surrogate_source_recipe(study, tmp_path):
    proc = run_shown("source", study, tmp_path / "run", ONE_SAMPLE)
    assert proc.returncode == 0, proc.stderr
    (sample,) = inputs(tmp_path / "run")
    assert sample["surrogates"]["shouted_primed"] == "WHAT IS THE CAPITAL OF FRANCE?!!"
    # As the page says: an argument the source does not accept is refused before any model loads.
    proc = run_shown("source", study, tmp_path / "refused", [*ONE_SAMPLE, "condition.surrogate=shouted:4"])
    assert proc.returncode == 2 and "shouted:4" in proc.stderr and "1, 2, 3" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "refused" / "scores.jsonl").exists()


def test_analysis_recipe(study, tmp_path):
    proc = run_shown("analysis", study, tmp_path / "run", ONE_SAMPLE)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    gap = pd.read_csv(run / "analyses" / "primed_gap.csv").set_index("condition")["mean_gap"]
    scores = pd.read_csv(run / "scores.csv").set_index("condition")["nll"]
    assert set(gap.index) == set(scores.index) and len(gap) == 5  # exp21's five conditions
    assert gap["bare"] == 0 and gap.sub(scores - scores["bare"]).abs().max() < 1e-9
    assert "Mean NLL gap to the baseline" in (run / "report.md").read_text()


def test_dataset_loader_recipe(study, tmp_path):
    proc = run_shown("loader", study, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    samples = inputs(tmp_path / "run")
    assert [s["sample_id"] for s in samples] == ["qa:2", "qa:3", "qa:4"]
    assert samples[0]["passage"] == "The Eiffel Tower, completed in 1889, stands in Paris."
    assert samples[0]["answer"] == "1889"
    # As the page says: a row without a query stops the run with the loader's paragraph, exit status 2.
    (study / "bad.csv").write_text("passage,query,answer\nSome passage.,,an answer\n")
    proc = run_shown("loader", study, tmp_path / "refused", ["dataset.path=bad.csv"])
    assert proc.returncode == 2 and "bad.csv, row 2: no query" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
