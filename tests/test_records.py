"""A directory's records stay true: a job's state is read from its own completion record (results.json, which
finalize writes after every other file), not from the presence of an error file, and a successful ``kvprime
report`` or ``kvprime resume`` removes the error.json of the failure it got past (tiny random model)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from fixtures import cli
from fixtures.jsonl import write_jsonl

from kvprime.scaleout.sweep import sweep_report

TINY = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false"]


def _kvprime(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "KVPRIME_HOME": str(tmp_path / "home")}
    env.pop("KVPRIME_DEBUG", None)
    return cli.run(args, env=env, cwd=tmp_path, timeout=600)


def _data(path: Path) -> Path:
    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the city of France and into the sea.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(3)]
    write_jsonl(path, rows)
    return path


@pytest.mark.integration
def test_jobs_that_failed_at_finalize_are_done_once_report_or_resume_gets_past_it(tmp_path):
    """Both jobs of a sweep fail at finalize: a folder is in the way of their summary.csv. Once it is gone, job 0
    is finished by `kvprime report`, job 1 by `kvprime resume`; each one's error.json goes, and the sweep report
    lists both as complete."""
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job / "summary.csv").mkdir(parents=True)  # finalize cannot write it: an internal error
    proc = _kvprime(["run", "-m", *TINY, "dataset=jsonl", f"dataset.path={_data(tmp_path / 'd.jsonl')}", "seed=1,2",
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    for job in ("0", "1"):
        d = sweep / job
        assert (d / "metadata.json").is_file() and not (d / "results.json").exists(), sorted(os.listdir(d))
        assert json.loads((d / "error.json").read_text())["internal"] is True
    assert [j["status"] for j in sweep_report(sweep)["jobs"]] == ["failed", "failed"]

    for job in ("0", "1"):
        (sweep / job / "summary.csv").rmdir()
    proc = _kvprime(["report", str(sweep / "0")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _kvprime(["resume", str(sweep / "1")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "results.json").is_file() and not (sweep / job / "error.json").exists()
    report = sweep_report(sweep)
    assert [j["status"] for j in report["jobs"]] == ["complete", "complete"] and not report["failed"]
    assert list(pd.read_csv(sweep / "jobs.csv").status) == ["complete", "complete"]
    assert "Failed jobs" not in (sweep / "sweep_report.md").read_text()


def _job(sweep: Path, n: int, files: dict[str, str]) -> None:
    d = sweep / str(n)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- seed={n + 1}\n")
    for name, text in files.items():
        (d / name).write_text(text)


ERROR = json.dumps({"type": "RuntimeError", "message": "an earlier failure", "internal": True})
SCORES = '{"sample_id": "a", "condition": "bare", "nll": 1.0}\n'
SUMMARY = "condition,is_baseline,verdict\nbare,True,baseline\n"


@pytest.mark.parametrize("files,status", [
    ({"scores.jsonl": SCORES, "metadata.json": "{}", "results.json": "{}", "error.json": ERROR}, "complete"),
    ({"scores.jsonl": SCORES, "metadata.json": "{}", "summary.csv": SUMMARY}, "partial"),  # killed in finalize
    ({"scores.jsonl": SCORES, "metadata.json": "{}", "error.json": ERROR}, "failed"),
    ({}, "missing-results"),
])
def test_a_jobs_status_is_its_completion_record_then_its_error_record(tmp_path, files, status):
    """results.json means done, whatever error.json says; without it, error.json means failed; with neither the
    job is not finished (killed or running): partial with scores, missing-results without."""
    sweep = tmp_path / "sweep"
    _job(sweep, 0, files)
    (job,) = sweep_report(sweep)["jobs"]
    assert job["status"] == status
    assert (job["error_type"] == "RuntimeError") == (status == "failed")


@pytest.mark.parametrize("command, fix", [("run", "kvprime resume"), ("merge", "same merge command again"),
                                          ("report", "try again")])
def test_a_busy_directory_suggests_what_fits_the_command_holding_it(tmp_path, command, fix):
    import socket

    from kvprime.files import rundir

    err = rundir.busy_error(tmp_path, {"command": command, "pid": 1, "host": socket.gethostname(), "started": "x"})
    assert fix in str(err)
    if command != "run":
        assert "kvprime resume" not in str(err)
