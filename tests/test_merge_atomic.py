"""``kvprime merge`` as atomic as ``kvprime run``: a merge writes into a work folder beside --out and renames it
into place when complete, so a merge killed anywhere leaves --out absent or complete, and the same command run
again finishes the job; ``--overwrite`` replaces a complete earlier merge, which stays until the new one is
complete.

The kill tests run the CLI through tests/fault_runner.py (its fork server, two at a time), which numbers every write
point of the merge (each ``write_atomic``: lock records, config, plan, inputs, scores, inspect, metadata, every
table, figure and report of finalize; each folder rename and removal) and SIGKILLs the process at one of them,
before, in the middle of or after the write. Every write point is killed in every mode. "Identical" is byte for
byte for every file of --out (lock files aside), with --out's own path written as ``<OUT>``, since each kill
merges into a folder of its own. The shards are tests/test_sweeps.py's (exp21, 7 samples in 3 shards).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_fault_injection import Launcher, _env, _events, _tail
from test_sweeps import data_file, sharded  # noqa: F401  (the merge tests' shards: fixtures, used by name)

from kvprime.files.rundir import HOLDER_NAME, LOCK_NAME
from kvprime.scaleout.merge import MergeError, merge_runs, replaced_dir, staging_dir

MODES = ("before", "after", "torn")
WORKERS = 2
MARKER = "earlier-merge.txt"  # put into the earlier merge that --overwrite replaces, to tell the two apart


def _shards(sharded) -> list[Path]:  # noqa: F811
    return [sharded / f"shard{i}" for i in range(3)]


def _files(out: Path, *copied_from: Path) -> dict[str, bytes]:
    """Every file under ``out`` but the lock files (and a killed lock's half-written record: a lock record is
    not a result), with its own path (and that of the folder it was copied from) written as <OUT>."""
    def plain(data: bytes) -> bytes:
        for path in (out, *copied_from):
            data = data.replace(str(path.resolve()).encode(), b"<OUT>")
        return data

    def lock_file(name: str) -> bool:
        return name in (LOCK_NAME, HOLDER_NAME) or (name.startswith(f".{HOLDER_NAME}.") and name.endswith(".tmp"))

    return {str(p.relative_to(out)): plain(p.read_bytes()) for p in sorted(out.rglob("*"))
            if p.is_file() and not lock_file(p.name)}


def _leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != out.name)


# ------------------------------------------------------------------------------------- in-process, fast

def test_merge_leaves_only_its_output_and_refuses_to_replace_without_overwrite(sharded, tmp_path):  # noqa: F811
    out = tmp_path / "merged"
    merge_runs(_shards(sharded), out)
    assert (out / "results.json").is_file() and _leftovers(tmp_path, out) == []
    first = _files(out)
    (out / MARKER).write_text("the earlier merge")
    with pytest.raises(MergeError, match="already holds a finished run directory.*add --overwrite"):
        merge_runs(_shards(sharded), out)
    assert (out / MARKER).exists() and _leftovers(tmp_path, out) == []  # refused: nothing changed or left
    merge_runs(_shards(sharded), out, overwrite=True)
    assert _files(out) == first and _leftovers(tmp_path, out) == []  # replaced whole: the marker went with it


def test_an_older_kvprimes_half_merge_is_named_and_overwrite_repairs_it(sharded, tmp_path):  # noqa: F811
    """The issue's case: a merge killed between scores.jsonl and metadata.json by a kvprime that wrote into --out
    directly. Every command's message names a fix that exists, and following it gives a complete merge."""
    from typer.testing import CliRunner

    from kvprime.commands.cli import app

    reference = tmp_path / "reference"
    merge_runs(_shards(sharded), reference)
    half = tmp_path / "half"
    half.mkdir()
    for name in ("config.json", "plan.json", "inputs.jsonl", "scores.jsonl"):
        shutil.copyfile(reference / name, half / name)
    with pytest.raises(MergeError, match="unfinished run directory.*add --overwrite"):
        merge_runs(_shards(sharded), half)
    runner = CliRunner()
    shards = [str(d) for d in _shards(sharded)]
    said = runner.invoke(app, ["report", str(half)])
    assert said.exit_code == 2 and "--overwrite" in " ".join(said.output.split()), said.output
    said = runner.invoke(app, ["resume", str(half)])
    assert said.exit_code == 2 and "--overwrite" in " ".join(said.output.split()), said.output
    said = runner.invoke(app, ["merge", *shards, "--out", str(half)])
    assert said.exit_code == 2 and "add --overwrite" in " ".join(said.output.split()), said.output
    said = runner.invoke(app, ["merge", *shards, "--out", str(half), "--overwrite"])
    assert said.exit_code == 0, said.output
    assert _files(half) == _files(reference)


def test_overwrite_replaces_only_a_run_directory(sharded, tmp_path):  # noqa: F811
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("not a run")
    with pytest.raises(MergeError, match="not a kvprime run directory"):
        merge_runs(_shards(sharded), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and _leftovers(tmp_path, out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    merge_runs(_shards(sharded), empty)  # an empty folder is a new one
    assert (empty / "results.json").is_file()


def test_a_failed_merge_leaves_no_output_and_no_work_folder(sharded, tmp_path, monkeypatch):  # noqa: F811
    from kvprime.errors import ConfigError
    from kvprime.reporting import finalize

    def broken(run_dir):
        (Path(run_dir) / "summary.csv").write_text("half")
        raise ConfigError("finalize refused")

    monkeypatch.setattr(finalize, "finalize", broken)
    out = tmp_path / "new" / "merged"
    with pytest.raises(ConfigError, match="finalize refused"):
        merge_runs(_shards(sharded), out)
    assert not (tmp_path / "new").exists()  # nor the parent this merge made


def test_a_killed_merges_work_folder_is_taken_over_and_a_live_one_is_refused(sharded, tmp_path):  # noqa: F811
    from filelock import FileLock

    out = tmp_path / "merged"
    work = staging_dir(out)
    work.mkdir()
    (work / "scores.jsonl").write_text('{"sample_id": "torn')
    (work / HOLDER_NAME).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname(),
                                                "command": "merge", "started": "earlier"}))  # no such process
    merge_runs(_shards(sharded), out)
    assert (out / "results.json").is_file() and _leftovers(tmp_path, out) == []

    other = tmp_path / "other"
    work = staging_dir(other)
    work.mkdir()
    held = FileLock(str(work / LOCK_NAME), timeout=0)
    held.acquire()  # as a running merge holds it
    try:
        (work / HOLDER_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                    "command": "merge", "started": "now"}))
        with pytest.raises(MergeError, match=f"another merge into {other} is running.*pid {os.getppid()}"):
            merge_runs(_shards(sharded), other)
        assert not other.exists() and (work / HOLDER_NAME).exists()  # the running merge's folder is untouched
    finally:
        held.release()


def test_a_swap_killed_between_its_renames_is_rolled_back_by_the_next_merge(sharded, tmp_path):  # noqa: F811
    out = tmp_path / "merged"
    merge_runs(_shards(sharded), out)
    (out / MARKER).write_text("the earlier merge")
    earlier = _files(out)
    os.replace(out, replaced_dir(out))  # killed after renaming the earlier merge aside, before the new one in
    with pytest.raises(MergeError, match="add --overwrite"):  # the earlier merge is back, so this is refused
        merge_runs(_shards(sharded), out)
    assert _files(out) == earlier and _leftovers(tmp_path, out) == []


# --------------------------------------------------------------------------- kill -9 at every write point

def _kill_and_rerun(point: dict, *, argv_for, ref: dict[str, bytes], earlier: dict[str, bytes] | None,
                    prepare, template: Path, root: Path, launchers: queue.Queue) -> list[str]:
    label = f"{point['scenario']}{point['n']:02d}_{point['mode']}"
    parent = root / label
    parent.mkdir()
    out = parent / "merged"
    prepare(out)
    argv, log = argv_for(out), root / f"{label}.events.jsonl"
    launch = launchers.get()
    try:
        code, text = launch(argv, root / f"{label}.kill.txt", events=log, kill_at=point["n"], mode=point["mode"])
        last = _events(log)[-1:] or [{}]
        if code != -signal.SIGKILL or last[0].get("killed") != point["n"]:
            return [f"{label}: not killed at write point {point['n']} ({point['file']}): exit {code}, last event "
                    f"{last[0]}\n{_tail(text)}"]
        problems = []
        state = _files(out, template) if out.exists() else None
        if state is not None and state != ref and state != earlier:
            problems.append(f"{label}: killed at {point['kind']} {point['file']}, --out is neither complete nor the "
                            f"earlier merge: {sorted(state)}")
        code, text = launch(argv, root / f"{label}.rerun.txt")
        if code != 0:
            return problems + [f"{label}: the same command run again failed (exit {code}):\n{_tail(text)}"]
        if _files(out) != ref:
            differ = sorted(k for k in set(ref) | set(_files(out)) if ref.get(k) != _files(out).get(k))
            problems.append(f"{label}: after the rerun these files differ from the uninterrupted merge's: {differ}")
        if _leftovers(parent, out):
            problems.append(f"{label}: the rerun left {_leftovers(parent, out)} beside --out")
        return problems
    finally:
        launchers.put(launch)


def _overwrite_points(events: list[dict]) -> list[tuple[dict, str]]:
    """The kills of a merge with --overwrite: its own write points (the lock record it writes into the earlier
    merge, the renames and the removal of the swap) in every mode; the others, which a new merge's kills cover in
    every mode already, each in one mode, taking turns (``KVPRIME_FAULT_POINTS=all``: every mode everywhere)."""
    own = [e for e in events if e["kind"] in ("rename", "remove") or Path(e["file"]).parent.name == "merged"]
    if os.environ.get("KVPRIME_FAULT_POINTS") == "all":
        return [(e, m) for e in events for m in MODES]
    rest = [e for e in events if e not in own]
    return [(e, m) for e in own for m in MODES] + [(e, MODES[i % len(MODES)]) for i, e in enumerate(rest)]


def _points(launch: Launcher, argv: list[str], log: Path, output: Path) -> list[dict]:
    code, text = launch(argv, output, events=log)
    assert code == 0, _tail(text)
    return [e for e in _events(log) if "n" in e]


@pytest.mark.integration
def test_a_merge_killed_at_every_write_point_is_absent_or_complete_and_the_rerun_finishes_it(sharded,  # noqa: F811
                                                                                               tmp_path):
    shards = [str(d) for d in _shards(sharded)]
    started = [Launcher(_env(tmp_path), tmp_path) for _ in range(WORKERS)]
    launchers: queue.Queue = queue.Queue()
    for launch in started:
        launchers.put(launch)
    try:
        _kill_everywhere(shards, tmp_path, launchers)
    finally:
        for launch in started:
            launch.close()


def _kill_everywhere(shards: list[str], root: Path, launchers: queue.Queue) -> None:
    def merge_into(out: Path, *flags: str) -> list[str]:
        return ["merge", *shards, "--out", str(out), *flags]

    template = root / "earlier" / "merged"  # a complete earlier merge, marked; each --overwrite kill gets a copy
    launch = launchers.get()
    try:
        ref_out = root / "reference" / "merged"
        new = _points(launch, merge_into(ref_out), root / "reference.events.jsonl", root / "reference.txt")
        ref = _files(ref_out)
        shutil.copytree(ref_out, template)
        (template / MARKER).write_text("the earlier merge")
        earlier = _files(template)
        counted = root / "counted" / "merged"
        shutil.copytree(template, counted)
        replacing = _points(launch, merge_into(counted, "--overwrite"), root / "counted.events.jsonl",
                            root / "counted.txt")
        assert _files(counted) == ref
    finally:
        launchers.put(launch)
    # Every file of the merged run is written through a write point that can be killed, and so is the rename.
    written = {Path(e["file"]).name for e in new}
    assert {"config.json", "scores.jsonl", "metadata.json", "summary.csv", "results.json", "report.md",
            "merged"} <= written, written
    assert [e["kind"] for e in replacing if e["kind"] in ("rename", "remove")] == ["rename", "rename", "remove"]

    def fresh(out: Path) -> None:
        out.parent.mkdir(exist_ok=True)

    def copy_of_earlier(out: Path) -> None:
        shutil.copytree(template, out)

    jobs = [({**e, "scenario": "new", "mode": m}, merge_into, None, fresh) for e in new for m in MODES]
    jobs += [({**e, "scenario": "overwrite", "mode": m}, lambda out: merge_into(out, "--overwrite"), earlier,
              copy_of_earlier) for e, m in _overwrite_points(replacing)]
    with ThreadPoolExecutor(WORKERS) as pool:
        found = list(pool.map(lambda job: _kill_and_rerun(
            job[0], argv_for=job[1], ref=ref, earlier=job[2], prepare=job[3], template=template, root=root,
            launchers=launchers), jobs))
    problems = [p for ps in found for p in ps]
    assert not problems, f"{len(problems)} problem(s) in {len(jobs)} kills:\n" + "\n".join(problems[:20])
