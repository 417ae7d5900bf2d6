"""The shards of one sharded run, read and checked, and the merged run's files in memory (``kvprime merge``).

``gather`` checks that the shards belong together (one config apart from ``run.shard``/``resume``/``progress``,
one plan, one model: name and weights digest), that they are exactly shards 0..N-1, each once and each finished,
and that together they hold the unsharded selection: every sample once, every (sample, condition) score once. It
returns what the merged run directory holds before finalize (``Merged``); it writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data import load_samples
from ..data.passages import chunks, passage_key
from ..errors import KvprimeError
from ..files.results_io import read_jsonl
from ..pipeline import metadata as md
from ..pipeline.sharding import chunk_size, grouped
from ..pipeline.sharding import shard as split

# Config keys that may differ between the shards of one run.
SHARD_FREE = ("resume", "progress", "tracking")


class MergeError(KvprimeError, ValueError):
    """The given directories are not the complete, consistent shards of one run."""


def _read(run_dir: Path, name: str):
    path = run_dir / name
    if not path.exists():
        why = ("the shard has not finished (metadata.json is written after its last score); resume it with "
               "`kvprime resume` first" if name == "metadata.json" else "it is not a kvprime run directory")
        raise MergeError(f"{run_dir}: {name} is missing; {why}.")
    return json.loads(path.read_text())


def _diff(a, b, prefix="") -> list[str]:
    """Dotted keys where two configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _without_shard(cfg: dict) -> dict:
    cfg = {k: v for k, v in cfg.items() if k not in SHARD_FREE}
    cfg["run"] = {k: v for k, v in (cfg.get("run") or {}).items() if k != "shard"}
    return cfg


def _model_key(meta: dict) -> dict:
    m = meta.get("model") or {}
    return {"name": m.get("name"), "weights_sha256": m.get("weights_sha256") or m.get("path")}


def show(ids, limit=5) -> str:
    ids = list(ids)
    return ", ".join(map(repr, ids[:limit])) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _check_selection(cfg: dict, merged_ids: list[str]) -> str:
    """Compare the merged sample order with the selection the dataset gives now (no model needed)."""
    try:
        expected = [s.sample_id for s in load_samples({**cfg["dataset"]}).samples]
    except Exception as err:  # noqa: BLE001 -- data not reachable here (hub, moved file): shard checks only
        return f"not re-checked against the dataset ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    if expected != merged_ids:
        have, want = set(merged_ids), set(expected)
        missing = [i for i in expected if i not in have]
        extra = [i for i in merged_ids if i not in want]
        detail = (f"missing {show(missing)}; " if missing else "") + (f"not in the selection {show(extra)}; "
                                                                      if extra else "")
        raise MergeError(f"the shards' samples do not equal the unsharded selection of dataset "
                         f"{cfg['dataset'].get('name')!r} ({len(expected)} samples, {len(merged_ids)} in the shards): "
                         f"{detail or 'same samples in another order; '}the data or loader changed since the shards "
                         "ran.")
    return "equal to the dataset's selection"


@dataclass
class Merged:
    """Everything a merge writes, checked and in the unsharded order, before anything is written."""

    cfg: dict
    plan: dict
    inputs: list[dict]
    score_lines: list[str]  # scores.jsonl's lines, each with its newline
    inspect: Path | None  # the shard's inspect.json that the unsharded run would have written
    meta: dict
    summary: dict  # results.json's "merge" entry


def gather(run_dirs: list[Path], out_dir: Path, check_dataset: bool) -> Merged:
    """Read and check the shards; the merged run's files, in memory. Raises ``MergeError``; writes nothing."""
    cfgs = [_read(d, "config.json") for d in run_dirs]
    plans = [_read(d, "plan.json") for d in run_dirs]

    # 1. One run: config (but the shard index), plan.
    ref, ref_dir = _without_shard(cfgs[0]), run_dirs[0]
    for d, cfg, plan in zip(run_dirs[1:], cfgs[1:], plans[1:], strict=True):
        diff = _diff(ref, _without_shard(cfg))
        if diff:
            raise MergeError(f"{d} and {ref_dir} are not shards of one run: their configs differ in "
                             f"{', '.join(diff)} (only run.shard, resume and progress may differ).")
        if plan != plans[0]:
            raise MergeError(f"{d} and {ref_dir} are not shards of one run: their plan.json (conditions) differ in "
                             f"{', '.join(_diff(plans[0], plan))}.")

    # 2. Exactly shards 0..N-1, each once.
    n = int((cfgs[0].get("run") or {}).get("num_shards", 1))
    by_shard: dict[int, list[Path]] = {}
    for d, cfg in zip(run_dirs, cfgs, strict=True):
        by_shard.setdefault(int((cfg.get("run") or {}).get("shard", 0)), []).append(d)
    repeated = {i: ds for i, ds in by_shard.items() if len(ds) > 1}
    if repeated:
        raise MergeError("duplicate shards: " + "; ".join(
            f"shard {i} of {n} given {len(ds)} times ({', '.join(map(str, ds))})" for i, ds in sorted(repeated.items())
        ))
    out_of_range = sorted(i for i in by_shard if not 0 <= i < n)
    if out_of_range:
        raise MergeError(f"shard index {out_of_range} outside 0..{n - 1} (run.num_shards={n}).")
    missing = [i for i in range(n) if i not in by_shard]
    if missing:
        raise MergeError(f"missing shards: {', '.join(map(str, missing))} of run.num_shards={n} "
                         f"(given: {', '.join(map(str, sorted(by_shard)))}). Run them (run.shard=<i>) and merge all "
                         f"{n}.")
    shard_dirs = [by_shard[i][0] for i in range(n)]
    metas = [_read(d, "metadata.json") for d in shard_dirs]

    # 3. One model.
    for d, meta in zip(shard_dirs[1:], metas[1:], strict=True):
        if _model_key(meta) != _model_key(metas[0]):
            raise MergeError(f"{d} and {shard_dirs[0]} scored with different models: "
                             f"{_model_key(meta)} vs {_model_key(metas[0])}.")

    # 4. Samples: disjoint, round-robin positions of one selection.
    for d in shard_dirs:
        if not (d / "inputs.jsonl").exists():
            raise MergeError(f"{d}: inputs.jsonl is missing; the shard has not finished.")
    inputs = [read_jsonl(d / "inputs.jsonl") for d in shard_dirs]
    owner: dict[str, list[int]] = {}
    for i, rows in enumerate(inputs):
        for r in rows:
            owner.setdefault(r["sample_id"], []).append(i)
    dup = {sid: sh for sid, sh in owner.items() if len(sh) > 1}
    if dup:
        raise MergeError(f"{len(dup)} sample(s) appear in more than one shard (or twice in one): "
                         + "; ".join(f"{sid!r} in shards {sh}" for sid, sh in list(dup.items())[:5]))
    total = sum(map(len, inputs))
    # Which selection positions each shard holds: the runner's own split applied to 0..total-1.
    run_cfg = dict(cfgs[0].get("run") or {})
    if grouped(cfgs[0]):
        positions = _passage_positions(inputs, n)
    else:
        positions = [split(list(range(total)), {**run_cfg, "num_shards": n, "shard": i}, chunk_size(cfgs[0]))
                     for i in range(n)]
    for i, rows in enumerate(inputs):
        if len(rows) != len(positions[i]):
            raise MergeError(f"shard {i} ({shard_dirs[i]}) holds {len(rows)} samples, but a {total}-sample selection "
                             f"split {n} ways gives shard {i} {len(positions[i])}: samples are missing or the shards "
                             "come from different selections.")
    merged_inputs: list = [None] * total
    for i, rows in enumerate(inputs):
        for pos, row in zip(positions[i], rows, strict=True):
            merged_inputs[pos] = row
    merged_ids = [r["sample_id"] for r in merged_inputs]
    selection = _check_selection(cfgs[0], merged_ids) if check_dataset else "not re-checked (check_dataset=False)"

    # 5. Scores: each (sample, condition) once, in its own shard, and none missing.
    names = list(plans[0]["conditions"])
    planned = set(names)
    skipped = {s["sample_id"]: s for meta in metas for s in meta.get("skipped", [])}
    seen: dict[tuple[str, str], int] = {}
    lines: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    for i, d in enumerate(shard_dirs):
        for key, line in _score_lines(d / "scores.jsonl"):
            if key in seen:
                problems.append(f"score {key} duplicated (shards {seen[key]} and {i})")
                continue
            seen[key] = i
            if owner.get(key[0]) != [i]:
                problems.append(f"score {key} in shard {i}, whose inputs.jsonl does not hold that sample")
            if key[1] not in planned:
                problems.append(f"score {key} names a condition not in the plan")
            lines[key] = line
    absent = [(sid, c) for sid in merged_ids if sid not in skipped for c in names if (sid, c) not in lines]
    if absent:
        problems.append(f"{len(absent)} score(s) missing, e.g. {show(absent, 3)} (resume that shard first)")
    if problems:
        raise MergeError(f"the shards' scores do not add up: {'; '.join(problems[:5])}"
                         + (f"; and {len(problems) - 5} more problems" if len(problems) > 5 else "") + ".")

    cfg = json.loads(json.dumps(cfgs[0]))
    cfg["run"] = {**(cfg.get("run") or {}), "num_shards": 1, "shard": 0}
    exact = True  # shards deal whole batching chunks, so each batches exactly as the unsharded run does
    return Merged(
        cfg=cfg, plan=plans[0], inputs=merged_inputs,
        score_lines=[lines[(sid, c)] for sid in merged_ids for c in names if (sid, c) in lines],
        inspect=_first_inspect(shard_dirs, next((sid for sid in merged_ids if sid not in skipped), None)),
        meta=_merged_metadata(metas, shard_dirs, inputs, merged_ids, skipped, out_dir, selection, exact),
        summary={"num_shards": n, "shards": [str(d) for d in shard_dirs], "n_samples": total,
                 "score_lines": len(lines), "selection_check": selection, "exact_vs_unsharded": exact})


def _score_lines(path: Path):
    """``((sample_id, condition), line)`` for each record of a shard's scores.jsonl, read a line at a time. The
    line is kept as the shard's run wrote it (``results_io.dumps``), so a merge's bytes are the one-job run's
    without encoding every record again."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MergeError(f"{path}, line {number}: not a whole JSON record ({err.msg}), as a shard killed while "
                                 f"writing leaves; `kvprime resume {path.parent}` repairs it.") from None
            if not isinstance(row, dict) or "sample_id" not in row or "condition" not in row:
                raise MergeError(f"{path}, line {number}: a score record needs the fields sample_id and condition; "
                                 "this file was not written by a kvprime run.")
            yield (row["sample_id"], row["condition"]), line if line.endswith("\n") else line + "\n"


def _first_inspect(shard_dirs: list[Path], first: str | None) -> Path | None:
    """The unsharded run inspects its first scored sample: the inspect.json of the shard that holds it."""
    if first is None:
        return None
    for d in shard_dirs:
        src = d / "inspect.json"
        if src.exists() and json.loads(src.read_text()).get("sample_id") == first:
            return src
    return None


def _merged_metadata(metas, shard_dirs, inputs, merged_ids, skipped, out_dir: Path, selection: str,
                     exact: bool) -> dict:
    n = len(shard_dirs)
    timings: dict[str, float] = {}
    for meta in metas:
        for k, v in (meta.get("timings_s") or {}).items():
            timings[k] = round(timings.get(k, 0.0) + float(v), 3)
    meta = json.loads(json.dumps(metas[0]))
    meta["dataset"]["sample_ids_sha256"] = md.sample_ids_sha256(merged_ids)
    # Shards may have run on different machines: the merged run's floor is the worst one measured.
    floors = [m["numerical_floor"] for m in metas if (m.get("numerical_floor") or {}).get("measured")]
    if floors:
        meta["numerical_floor"] = max(floors, key=lambda f: f.get("max_nll_abs_diff") or 0.0)
    meta.update(
        skipped=[skipped[sid] for sid in merged_ids if sid in skipped],
        log_lines_repaired_on_resume=sum(m.get("log_lines_repaired_on_resume", 0) for m in metas),
        model_encodes=sum(m.get("model_encodes", 0) for m in metas),
        encoded_tokens=sum(m.get("encoded_tokens", 0) for m in metas),
        timings_s=timings,  # summed over shards (compute time, not wall time: shards may run in parallel)
        run_dir=str(out_dir.resolve()),
        merged_from={"num_shards": n, "selection_check": selection, "exact_vs_unsharded": exact,
                     "shards": [
            {"shard": i, "run_dir": str(d.resolve()), "n_samples": len(inputs[i]),
             "model_encodes": m.get("model_encodes"), "encoded_tokens": m.get("encoded_tokens"),
             "timings_s": m.get("timings_s"), "git": m.get("git"), "device": (m.get("environment") or {}).get("device"),
             "platform": (m.get("environment") or {}).get("platform")}
            for i, (d, m) in enumerate(zip(shard_dirs, metas, strict=True))]},
    )
    return meta


def _passage_positions(inputs: list[list[dict]], n: int) -> list[list[int]]:
    """Selection positions of each shard's rows when chunks are whole passages (``dataset.group_by_passage``):
    chunk g of the selection went to shard g % n as its (g // n)-th passage, so the shards' passages, taken
    round-robin, rebuild the selection's order."""
    per_shard = [chunks(rows, key=lambda r: passage_key(r["passage"])) for rows in inputs]
    positions: list[list[int]] = [[] for _ in range(n)]
    at = 0
    for g in range(sum(map(len, per_shard))):
        shard, k = g % n, g // n
        if k >= len(per_shard[shard]):
            raise MergeError(f"shard {shard} holds {len(per_shard[shard])} passages, too few for a selection dealt "
                             f"{n} ways one passage at a time: passages are missing or the shards come from "
                             "different selections.")
        size = len(per_shard[shard][k])
        positions[shard].extend(range(at, at + size))
        at += size
    return positions
