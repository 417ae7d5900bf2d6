"""``kvprime bench-scale``: does a run's memory stay flat, and do ``report`` and ``merge`` grow linearly, with n?

exp21 on the tiny random model over synthetic samples (seeded, written to the bench's folder): for each n, one
unsharded run, ``kvprime report`` on it, and (``shards`` > 0) the same selection as ``shards`` shard jobs joined by
``kvprime merge``. Every command runs in a process of its own, started through a small wrapper that reports the
command's own peak resident memory (``ru_maxrss`` of its only child), so one command's peak does not hide
another's. The merged run's tables must equal the unsharded run's byte for byte (sharding deals whole scoring
chunks, so they do); the bench says so per n.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..files.results_io import write_atomic, write_json

# One command in a process of its own; prints its peak RSS (kB on Linux) as the wrapper's last stdout line.
_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
_WORDS = ("the river city old tower grain boats carry north south bridge market stone king court year people built "
          "war ship harbour wall gate field mill road hill lake forest").split()
RUN_ARGS = ("experiment=exp21", "model=tiny_random_llama", "dataset=jsonl", "progress=false")
COMPARED = ("summary.csv", "comparisons.csv")


def synthetic_samples(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` JSONL samples of about 45 words, each with its own id, question and answer."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        passage = " ".join(rng.choice(_WORDS) for _ in range(40)) + f" The market of tower {i} is by the lake."
        lines.append(json.dumps({"id": f"s{i}", "passage": passage, "query": f"Where is the market of tower {i}?",
                                 "answer": "by the lake"}))
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def machine() -> str:
    """The CPU's model name and core count (Linux's /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _timed(argv: list[str], log: Path) -> dict:
    """Run one command; its wall time and its own peak resident memory."""
    t = time.perf_counter()
    with log.open("a") as fh:
        out = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], stdout=subprocess.PIPE, stderr=fh, text=True)
        fh.write(out.stdout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}; see {log}")
    return {"seconds": round(time.perf_counter() - t, 2), "peak_mb": round(int(out.stdout.split()[-1]) / 1024)}


def _kvprime(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvprime", *args]


def scale(out: Path, ns: list[int], shards: int = 10, extra: Sequence[str] = ()) -> dict:
    """Measure every n of ``ns``; writes ``scale.json`` and ``scale.md`` into ``out`` and returns the record."""
    data = synthetic_samples(out / "samples.jsonl", max(ns))
    log = out / "commands.log"
    rows = []
    for n in ns:
        base = [*RUN_ARGS, f"dataset.path={data}", f"dataset.n_samples={n}", *extra]
        run_dir = out / f"run_{n}"
        row = {"n": n, "run": _timed(_kvprime("run", *base, f"hydra.run.dir={run_dir}"), log)}
        lines = sum(1 for _ in (run_dir / "scores.jsonl").open())
        row["score_lines"] = lines
        row["report"] = _timed(_kvprime("report", str(run_dir)), log)
        if shards:
            shard_dirs = [out / f"shards_{n}" / str(i) for i in range(shards)]
            for i, d in enumerate(shard_dirs):
                _timed(_kvprime("run", *base, f"run.num_shards={shards}", f"run.shard={i}", f"hydra.run.dir={d}"),
                       log)
            merged = out / f"merged_{n}"
            row["merge"] = _timed(_kvprime("merge", *map(str, shard_dirs), "--out", str(merged)), log)
            row["merged_equals_unsharded"] = all((merged / f).read_bytes() == (run_dir / f).read_bytes()
                                                 for f in COMPARED)
        rows.append(row)
    record = {"machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": list(extra), "shards": shards,
              "rows": rows}
    write_json(out / "scale.json", record)
    write_atomic(out / "scale.md", render(record))
    return record


def render(record: dict) -> str:
    rows = record["rows"]
    first = rows[0]
    lines = [f"# kvprime bench-scale ({record['date']}, {record['machine']})", "",
             "exp21, tiny random Llama, synthetic samples; each command in its own process.", "",
             "| n | score lines | run s | run peak MB | report s | report peak MB | merge s | merge peak MB | "
             "merged = unsharded |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("merge") or {}
        lines.append(f"| {r['n']} | {r['score_lines']} | {r['run']['seconds']} | {r['run']['peak_mb']} | "
                     f"{r['report']['seconds']} | {r['report']['peak_mb']} | {m.get('seconds', '')} | "
                     f"{m.get('peak_mb', '')} | {r.get('merged_equals_unsharded', '')} |")
    lines.append("")
    for r in rows[1:]:
        k = r["n"] / first["n"]
        parts = [f"run peak memory {r['run']['peak_mb'] / first['run']['peak_mb']:.2f}x",
                 f"report time {r['report']['seconds'] / first['report']['seconds']:.1f}x"]
        if r.get("merge") and first.get("merge"):
            parts.append(f"merge time {r['merge']['seconds'] / first['merge']['seconds']:.1f}x")
        lines.append(f"- n x{k:g} ({first['n']} -> {r['n']}): " + ", ".join(parts) + ".")
    return "\n".join(lines) + "\n"
