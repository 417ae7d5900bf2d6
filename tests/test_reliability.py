"""One run, one directory: unique names, one writer at a time, refusals that change nothing, interrupts,
a full disk, and internal errors that say they are internal."""

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fixtures import cli
from fixtures.jsonl import TOWER_PASSAGE

from kvprime.config.compose import compose
from kvprime.errors import RunDirError
from kvprime.files import rundir
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner

TINY = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false"]
# Runs a CLI command with every chunk of scoring slowed down (SLOW_S seconds), so a test can act while the run holds
# its directory; with GATE set, every chunk after the first waits until that file exists, so the run holds its
# directory until the test releases it.
SLOW = ("import os, sys, time; from kvprime.builders.engine import Engine; real = Engine.run_chunk; chunks = [0]\n"
        "def slow(self, *a, **k):\n"
        "    chunks[0] += 1; gate = os.environ.get('GATE')\n"
        "    while gate and chunks[0] > 1 and not os.path.exists(gate): time.sleep(0.05)\n"
        "    time.sleep(0 if gate else float(os.environ.get('SLOW_S', '1')))\n"
        "    return real(self, *a, **k)\n"
        "Engine.run_chunk = slow\nfrom kvprime.commands.cli import main; sys.argv = ['kvprime', *sys.argv[1:]]; main()")
# A refusal that waited for the lock would wait for ever (the holder waits at its gate); this only ends the test.
HANG_S = 300


@pytest.fixture()
def data_file(river_samples):
    return river_samples(8, passage=TOWER_PASSAGE)


def _env(tmp_path, **extra):
    return {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def _cli(args, tmp_path, code=None, timeout=600, **env):
    return cli.run(args, code=code, env=_env(tmp_path, **env), cwd=tmp_path, timeout=timeout)


def _popen(args, tmp_path, **env):
    return subprocess.Popen([sys.executable, "-c", SLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(tmp_path, **env), cwd=tmp_path)


def _tree_hash(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _wait_for_scores(path: Path, proc, n=1, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.1)
    raise AssertionError("no score line appeared")


@pytest.mark.integration
def test_runs_started_together_get_their_own_directories(tmp_path, data_file):
    procs = [subprocess.Popen([sys.executable, "-m", "kvprime", "run", *TINY, "dataset=jsonl",
                               f"dataset.path={data_file}", f"seed={seed}", f"dataset.n_samples={n}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
             for seed, n in ((1, 3), (2, 4))]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    runs = sorted(d for d in (tmp_path / "outputs" / "exp21").iterdir() if d.name != "latest")
    assert len(runs) == 2
    seen = set()
    for d in runs:
        cfg, meta = json.loads((d / "config.json").read_text()), json.loads((d / "metadata.json").read_text())
        rows = read_jsonl(d / "scores.jsonl")
        assert cfg["seed"] == meta["seed"]
        n = cfg["dataset"]["n_samples"]
        assert len(rows) == n * 5 and len({r["sample_id"] for r in rows}) == n
        seen.add((cfg["seed"], n))
    assert seen == {(1, 3), (2, 4)}
    assert (tmp_path / "outputs" / "exp21" / "latest").resolve() in runs


def test_new_run_dir_is_exclusive_and_unique(tmp_path):
    made = {rundir.new_run_dir(str(tmp_path / "exp")) for _ in range(50)}
    assert len(made) == 50 and all(Path(d).is_dir() for d in made)


@pytest.mark.integration
def test_a_held_directory_refuses_run_resume_and_report_and_is_left_unchanged(tmp_path, data_file):
    run_dir = tmp_path / "held"
    gate = tmp_path / "release"
    args = ["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", f"hydra.run.dir={run_dir}", "batch.samples=1"]
    proc = _popen(args, tmp_path, GATE=str(gate))  # 8 chunks: after the first, the run holds until `gate` exists
    try:
        _wait_for_scores(run_dir / "scores.jsonl", proc)
        fixed = ("config.json", "plan.json", "inputs.jsonl", ".hydra/overrides.yaml", ".hydra/config.yaml")
        before = {f: (run_dir / f).read_bytes() for f in fixed}
        log_before = (run_dir / "scores.jsonl").read_bytes()
        for cmd in (args, ["resume", str(run_dir)], ["report", str(run_dir)]):
            try:
                out = _cli(cmd, tmp_path, timeout=HANG_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"`kvprime {cmd[0]}` waited for the held directory instead of refusing at once")
            msg = " ".join(out.stderr.split())
            assert out.returncode == 2, out.stderr
            assert "in use by `kvprime run`" in msg and f"pid {proc.pid} on host {socket.gethostname()}" in msg, msg
            assert "Traceback" not in msg
            # refused while the holder still held the directory: it did not wait for the lock to be released
            assert proc.poll() is None and not gate.exists()
        assert {f: (run_dir / f).read_bytes() for f in fixed} == before
        assert (run_dir / "scores.jsonl").read_bytes().startswith(log_before)
        gate.touch()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
    rows = read_jsonl(run_dir / "scores.jsonl")
    assert len(rows) == len({(r["sample_id"], r["condition"]) for r in rows}) == 8 * 5
    assert not (run_dir / rundir.HOLDER_NAME).exists() and not (run_dir / "error.json").exists()


@pytest.mark.integration
def test_stale_lock_of_a_killed_process_is_taken_over_and_another_hosts_is_not(tmp_path, data_file):
    run_dir = tmp_path / "r"
    cfg = compose([*TINY, "dataset=jsonl", f"dataset.path={data_file}", "dataset.n_samples=2"])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kvprime.files.rundir import RunLock; "
                               f"lock = RunLock({str(run_dir)!r}, 'run').acquire(); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    run_dir.mkdir()
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
        runner.run_experiment(cfg, run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run_dir / rundir.HOLDER_NAME).read_text())["pid"] == holder.pid  # left behind
    results = runner.run_experiment(cfg, run_dir)  # taken over
    assert results["counts"]["score_lines"] == 2 * 5
    assert not (run_dir / rundir.HOLDER_NAME).exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / rundir.HOLDER_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-node", "command": "run",
                                                        "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunDirError, match="elsewhere-node") as info:
        runner.run_experiment(cfg, other)
    assert f"delete {other / rundir.HOLDER_NAME}" in str(info.value)
    assert sorted(p.name for p in other.iterdir()) == [rundir.HOLDER_NAME]


@pytest.mark.integration
def test_a_refused_run_leaves_a_finished_directory_byte_identical(tmp_path, data_file):
    run_dir = tmp_path / "done"
    ok = _cli(["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", "dataset.n_samples=2",
               f"hydra.run.dir={run_dir}"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    before = _tree_hash(run_dir)
    for extra in (["seed=3"], ["seed=3", "resume=true"], ["conditions.truncated_oracle.surrogate=static:nonsense"]):
        out = _cli(["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", "dataset.n_samples=2",
                    f"hydra.run.dir={run_dir}", *extra], tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert _tree_hash(run_dir) == before, extra
    out = _cli(["resume", str(run_dir)], tmp_path)  # the record was not clobbered: the run still resumes
    assert out.returncode == 0, out.stderr


@pytest.mark.integration
def test_a_refused_run_removes_only_what_it_made(tmp_path, data_file):
    mine = tmp_path / "mine"
    mine.mkdir()
    bad = ["conditions.truncated_oracle.surrogate=static:nonsense"]
    out = _cli(["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", f"hydra.run.dir={mine / 'a' / 'b'}",
                *bad], tmp_path)
    assert out.returncode == 2
    assert mine.is_dir() and list(mine.iterdir()) == []  # the user's empty folder stays; a/b are gone
    out = _cli(["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", f"hydra.run.dir={mine}", *bad], tmp_path)
    assert out.returncode == 2 and mine.is_dir()
    out = _cli(["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", *bad], tmp_path)
    assert out.returncode == 2 and not (tmp_path / "outputs" / "exp21").exists()  # default dirs it made: gone


@pytest.mark.integration
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR2, 140)])
def test_interrupt_stops_at_a_record_boundary_and_says_how_to_continue(tmp_path, data_file, sig, code):
    run_dir = tmp_path / "int"
    proc = _popen(["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", f"hydra.run.dir={run_dir}"],
                  tmp_path, SLOW_S="1")
    _wait_for_scores(run_dir / "scores.jsonl", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    text = (run_dir / "scores.jsonl").read_text()
    assert text.endswith("\n")
    n = len(text.splitlines())
    msg = " ".join(err.split())
    assert f"interrupted ({signal.Signals(sig).name}) after {n} of 40 score records" in msg
    assert f"kvprime resume {run_dir}" in msg and "Traceback" not in msg
    out = _cli(["resume", str(run_dir)], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = read_jsonl(run_dir / "scores.jsonl")
    assert len(rows) == len({(r["sample_id"], r["condition"]) for r in rows}) == 40


def test_full_disk_while_logging_scores_leaves_whole_records_and_resumes_exactly(tmp_path, data_file, monkeypatch):
    cfg = [*TINY, "dataset=jsonl", f"dataset.path={data_file}", "dataset.n_samples=4", "batch.samples=2"]
    reference = tmp_path / "ref"
    runner.run_experiment(compose(cfg), reference)

    real_write, calls = os.write, {"n": 0}

    def full_disk(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith("scores.jsonl"):
            calls["n"] += 1
            if calls["n"] == 7:  # half of the 7th line reaches the disk, then the disk is full
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    run_dir = tmp_path / "full"
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(RunDirError, match="no space left on the device") as info:
        runner.run_experiment(compose(cfg), run_dir)
    monkeypatch.setattr(os, "write", real_write)
    assert "kvprime resume" in str(info.value) and str(run_dir / "scores.jsonl") in str(info.value)
    text = (run_dir / "scores.jsonl").read_text()
    assert text.endswith("\n") and len(read_jsonl(run_dir / "scores.jsonl")) == 6  # no torn line
    runner.run_experiment(compose([*cfg, "resume=true"]), run_dir)
    for name in ("summary.csv", "comparisons.csv", "scores.csv"):
        a, b = pd.read_csv(reference / name), pd.read_csv(run_dir / name)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-12)


def test_internal_error_is_reported_as_internal_with_the_traceback_saved(tmp_path, data_file, monkeypatch, capsys):
    from kvprime.builders.engine import Engine
    from kvprime.commands.app import run_hydra_app

    def broken(self, *a, **k):
        raise TypeError("unsupported operand in a kvprime bug")

    monkeypatch.setattr(Engine, "score_many", broken)
    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.delenv("KVPRIME_DEBUG", raising=False)
    run_dir = tmp_path / "bug"
    code = run_hydra_app([*TINY, "dataset=jsonl", f"dataset.path={data_file}", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 1
    msg = " ".join(err.split())
    assert "kvprime: internal error: TypeError: unsupported operand in a kvprime bug" in msg
    assert f"saved to {run_dir / 'error.json'}" in msg and "KVPRIME_DEBUG=1" in msg and "Traceback" not in msg
    saved = json.loads((run_dir / "error.json").read_text())
    assert saved["internal"] is True and "Traceback" in saved["traceback"] and "broken" in saved["traceback"]


def test_internal_error_before_the_directory_is_claimed_saves_the_traceback_elsewhere(tmp_path, monkeypatch, capsys):
    from kvprime.commands import app as cli

    def broken(*a, **k):
        raise KeyError("internal")

    monkeypatch.setattr(runner, "prepare", broken)
    monkeypatch.setenv("KVPRIME_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    code = cli.run_hydra_app([*TINY, "dataset=exp21_sanity"])
    err = capsys.readouterr().err
    assert code == 1 and "internal error: KeyError" in err
    saved = list((tmp_path / "home" / "errors").iterdir())
    assert len(saved) == 1 and "Traceback" in saved[0].read_text() and str(saved[0]) in " ".join(err.split())


@pytest.mark.integration
def test_multirun_job_errors_are_paragraphs_in_the_terminal_and_error_json(tmp_path):
    sweep = tmp_path / "sweep"
    out = _cli(["run", "-m", *TINY, "dataset=exp21_sanity", "seed=1,-1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "kvprime: error: seed=-1" in out.stderr
    saved = json.loads((sweep / "1" / "error.json").read_text())
    assert saved["internal"] is False and saved["paragraph"].startswith("kvprime: error: seed=-1")
    assert (sweep / "0" / "report.md").exists()


@pytest.mark.integration
@pytest.mark.parametrize("args,setting", [
    (["run", "hydra.run.dir=/etc/hostname/x"], "hydra.run.dir"),
    (["run", "-m", "seed=1,2", "hydra.sweep.dir=/etc/hostname/x"], "hydra.sweep.dir"),
    (["merge", "/nonexistent-shard", "--out", "/etc/hostname/x"], "--out"),
])
def test_unwritable_output_paths_get_one_paragraph(tmp_path, args, setting):
    out = _cli(args, tmp_path)
    msg = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in msg, msg
    assert f"{setting} points at /etc/hostname/x" in msg and "/etc/hostname is a file" in msg


@pytest.mark.integration
def test_output_root_on_a_file_gets_one_paragraph(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = _cli(["run", *TINY], tmp_path, KVPRIME_OUTPUT_ROOT=str(blocker))
    msg = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in msg
    assert "KVPRIME_OUTPUT_ROOT" in msg and f"{blocker} is a file" in msg


@pytest.mark.integration
def test_library_warnings_go_to_the_run_log_not_the_terminal(tmp_path, data_file):
    noisy = ("import sys, warnings; from kvprime.builders.engine import Engine; real = Engine.score_many\n"
             "def noisy(self, *a, **k):\n    warnings.warn('a library deprecation notice', FutureWarning)\n"
             "    return real(self, *a, **k)\n"
             "Engine.score_many = noisy\nfrom kvprime.commands.cli import main\n"
             "sys.argv = ['kvprime', *sys.argv[1:]]; main()")
    run_dir = tmp_path / "w"
    args = ["run", *TINY, "dataset=jsonl", f"dataset.path={data_file}", "dataset.n_samples=2",
            f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "KVPRIME_DEBUG"}
    out = subprocess.run([sys.executable, "-c", noisy, *args], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs")}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "a library deprecation notice" not in out.stderr + out.stdout
    log = (run_dir / "run.log").read_text()
    assert "a library deprecation notice" in log
    # The run's log holds what the terminal showed: the results table and where the report went.
    assert "baseline 'bare'" in out.stdout and "baseline 'bare'" in log and f"wrote {run_dir}/report.md" in log


# Runs a CLI command whose run is refused once it holds its directory and has written its first files (the
# version record, config.json, plan.json), before any score.
REFUSED_AFTER_START = ("import sys\nfrom kvprime.builders import floor\nfrom kvprime.errors import RunError\n"
                       "def refuse(*a, **k):\n    raise RunError('refused once the run had started')\n"
                       "floor.for_run = refuse\n"
                       "from kvprime.commands.cli import main; sys.argv = ['kvprime', *sys.argv[1:]]; main()")


@pytest.mark.integration
def test_a_run_refused_after_it_took_the_lock_leaves_nothing_and_latest_as_it_was(tmp_path):
    """A run refused before it holds its directory (two samples with the same query: no random_query control),
    and one refused after it wrote its first files, must both remove what they made and leave `latest` where it
    pointed."""
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"id": f"s{i}", "passage": f"Passage {i} about rivers and the sea.",
                                        "query": "Where does it flow?", "answer": "the sea"}) + "\n" for i in range(2)))
    ok = _cli(["run", *TINY, "dataset=exp21_sanity"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    exp_dir = tmp_path / "outputs" / "exp21"
    before = sorted(p.name for p in exp_dir.iterdir())
    latest = os.readlink(exp_dir / "latest")
    out = _cli(["run", *TINY, "dataset=jsonl", f"dataset.path={same}"], tmp_path)
    assert out.returncode == 2 and "random_query" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert sorted(p.name for p in exp_dir.iterdir()) == before
    assert os.readlink(exp_dir / "latest") == latest
    out = _cli(["run", *TINY, "dataset=exp21_sanity"], tmp_path, code=REFUSED_AFTER_START)
    assert out.returncode == 2 and "refused once the run had started" in out.stderr, out.stderr
    assert sorted(p.name for p in exp_dir.iterdir()) == before
    assert os.readlink(exp_dir / "latest") == latest


def test_a_holder_record_whose_pid_was_reused_is_stale(tmp_path, data_file):
    run_dir = tmp_path / "reused"
    run_dir.mkdir()
    # A live process of this host (our parent) named in the record, but nobody holds the OS lock: the record
    # was left by a killed run whose pid has since been given to another process.
    (run_dir / rundir.HOLDER_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                          "command": "run", "started": "2026-01-01T00:00:00"}))
    (run_dir / rundir.LOCK_NAME).write_text("")
    cfg = compose([*TINY, "dataset=jsonl", f"dataset.path={data_file}", "dataset.n_samples=2"])
    assert runner.run_experiment(cfg, run_dir)["counts"]["score_lines"] == 2 * 5
