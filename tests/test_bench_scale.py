"""kvprime bench-scale: measures what it says on a small n (the figures themselves are the README's)."""

import json
import os

import pytest
from fixtures import cli


@pytest.mark.integration
def test_bench_scale_runs_reports_and_merges_and_checks_the_merge(tmp_path):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = cli.run(["bench-scale", "--n", "6", "--shards", "2",
                   "stats.n_boot=1000"], env=env, timeout=900)
    assert out.returncode == 0, out.stderr
    (found,) = (tmp_path / "bench-scale").glob("*/scale.json")
    record = json.loads(found.read_text())
    assert [r["n"] for r in record["rows"]] == [6]  # one n: the figures against n are the bench's, not a test's
    for r in record["rows"]:
        assert r["score_lines"] == 5 * r["n"]  # exp21: five conditions, every line streamed to scores.jsonl
        assert r["merged_equals_unsharded"] is True
        assert r["run"]["peak_mb"] > 0 and r["report"]["seconds"] > 0 and r["merge"]["peak_mb"] > 0
    assert "| 6 | 30 |" in (found.parent / "scale.md").read_text()


@pytest.mark.integration
def test_bench_scale_refuses_a_bad_n_in_one_paragraph(tmp_path):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path)}
    out = cli.run(["bench-scale", "--n", "ten"], env=env, timeout=300)
    assert out.returncode == 2 and "--n 'ten' is not accepted" in out.stderr and "Traceback" not in out.stderr
