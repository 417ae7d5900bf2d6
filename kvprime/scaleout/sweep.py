"""``kvprime report <sweep_dir>``: one report over the jobs of a Hydra multirun (``kvprime run -m ...``).

A sweep directory is ``<root>/multirun/<experiment>/<timestamp>/`` with Hydra's ``multirun.yaml`` and one
numbered directory per job (each an ordinary run directory with ``.hydra/overrides.yaml``). The report
reads only files: each job's overrides (the keys whose values differ between jobs are the sweep's
columns), its ``summary.csv`` and, for a failed job, its ``error.json``. It writes

- ``sweep_summary.csv``: a row per job and condition (job, swept keys, condition, n, mean NLL, delta vs
  the baseline with its CI, p_holm, d_z, verdict);
- ``jobs.csv``: a row per job (status, the error's type and message for failed jobs);
- ``sweep_effect.png``: each non-baseline condition's mean delta (95% CI bars) against the swept value when
  one numeric key is swept, else grouped bars per job;
- ``sweep_report.md``: both tables, the figure, the failed jobs and why, and the command that resumes it;
- ``sweep_report.html``: the same as one self-contained page, each job's row linking to the job's ``report.html``.

A job's status comes from its own completion record first: ``results.json``, which finalize writes after every
other file (``kvprime.reporting.finalize``).

- ``complete``: ``results.json`` is there. An ``error.json`` beside it is from an earlier failure that a later
  ``resume`` or ``report`` got past: it does not make the job failed.
- ``failed``: no ``results.json``, and the job's ``error.json`` says why.
- ``partial``: neither, with score lines: killed, or still running (``resume`` continues it).
- ``missing-results``: neither, and no score line: killed or still running before its first score.
- ``not-started``: a job the sweep declares whose directory does not exist.

Given the same files it writes the same bytes.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ..errors import MissingFileError
from ..files.results_io import write_atomic, write_json
from ..reporting import html
from ..reporting.finalize import COMPLETION_RECORD
from ..reporting.tables import markdown_table
from .hydra_sweeper import split_jobs

# Overrides that do not define a job (they may differ between the first run and a resumed one).
NOT_SWEPT = ("resume", "progress")
SUMMARY_COLUMNS = ("condition", "n", "mean_nll", "mean_delta", "ci_low", "ci_high", "p_holm", "d_z", "verdict")
STATUSES = ("complete", "partial", "failed", "missing-results", "not-started")


def job_dirs(sweep_dir) -> list[Path]:
    """The sweep's job directories (numbered subdirectories), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def is_sweep_dir(path) -> bool:
    """A Hydra multirun directory: ``multirun.yaml``, or numbered job directories that hold ``.hydra``."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / "multirun.yaml").is_file() or any((d / ".hydra").is_dir() for d in job_dirs(path))


def _parser():
    return OverridesParser.create()


def _parse(overrides: list[str]) -> dict[str, object]:
    """``key -> value`` of a job's overrides (Hydra's grammar: quoting, lists, null)."""
    out = {}
    for o in _parser().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key in NOT_SWEPT or key.startswith("hydra."):
            continue
        out[key] = None if o.is_delete() else _plain(o.value())
    return out


def _plain(value):
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value)
    if isinstance(value, (list, dict, str, int, float, bool)) or value is None:
        return value
    return str(value)


def _expected_jobs(sweep_dir: Path) -> tuple[list[list[str]] | None, list[str], list[str] | None]:
    """From ``multirun.yaml`` (basic sweeper): every job's overrides in job order, the keys declared as sweeps,
    and the command line's overrides (launcher choice included). None where that cannot be known."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None, [], None
    try:
        conf = OmegaConf.load(path)
        if not isinstance(conf, DictConfig):  # not a multirun record: judge by the job dirs alone
            return None, [], None
        hydra = conf.get("hydra") or {}
        task = [str(x) for x in OmegaConf.select(conf, "hydra.overrides.task", default=[]) or []]
        launch = [str(x) for x in OmegaConf.select(conf, "hydra.overrides.hydra", default=[]) or []
                  if not str(x).startswith(("hydra.mode=", "hydra.sweep.dir="))]
        sweeper = hydra.get("sweeper") or {}
        params = sweeper.get("params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + task
        parsed = _parser().parse_overrides(args)
        declared = []
        for o in parsed:
            if o.is_sweep_override() and o.key_or_group not in declared:
                declared.append(o.key_or_group)
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None, declared, launch + task
        return split_jobs(parsed), declared, launch + task
    except Exception:  # noqa: BLE001 -- unreadable/foreign multirun.yaml: judge by the job dirs alone
        return None, [], None


def _job_status(job_dir: Path) -> dict:
    """The job's status (see the module's docstring), its score line count and, if failed, its error."""
    row: dict = {"status": "missing-results", "score_lines": _score_line_count(job_dir / "scores.jsonl"),
                 "error_type": "", "error_message": ""}
    err = job_dir / "error.json"
    if (job_dir / COMPLETION_RECORD).is_file():
        row["status"] = "complete"
    elif err.is_file():
        try:
            info = json.loads(err.read_text())
        except json.JSONDecodeError:
            info = {"type": "unreadable error.json", "message": ""}
        row.update(status="failed", error_type=str(info.get("type", "")),
                   error_message=" ".join(str(info.get("message", "")).split()))
    elif row["score_lines"]:
        row["status"] = "partial"
    return row


def _score_line_count(path: Path) -> int:
    """Non-empty lines of a job's score log, read a line at a time (a killed job's torn last line counts: resume
    repairs it)."""
    if not path.is_file():
        return 0
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


def _label(value) -> str:
    """A swept value as one readable line (templates keep their \\n visible)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)[1:-1] if any(c in value for c in "\n\t\"\\") else value
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return repr(value)
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sweep_report(sweep_dir) -> dict:
    """Write sweep_summary.csv, jobs.csv, sweep_effect.png and sweep_report.md into ``sweep_dir``; return
    ``{"sweep_dir", "swept_keys", "jobs": [...], "summary": [...], "failed": [...], "files": {...}}``."""
    sweep_dir = Path(sweep_dir)
    if not is_sweep_dir(sweep_dir):
        raise MissingFileError(f"{sweep_dir} is not a Hydra sweep directory (no multirun.yaml and no numbered job "
                                "directories with .hydra/). For one run directory, `kvprime report` rebuilds its "
                                "report.")
    expected, declared, task = _expected_jobs(sweep_dir)
    on_disk = {int(d.name): d for d in job_dirs(sweep_dir)}
    numbers = sorted(set(on_disk) | set(range(len(expected or []))))

    jobs = []
    for num in numbers:
        d = on_disk.get(num)
        overrides = None
        if d is not None and (d / ".hydra" / "overrides.yaml").is_file():
            overrides = [str(x) for x in yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []]
        elif expected is not None and num < len(expected):
            overrides = expected[num]
        status = _job_status(d) if d is not None else {"status": "not-started", "score_lines": 0, "error_type": "",
                                                        "error_message": ""}
        jobs.append({"job": num, "dir": d, "values": _parse(overrides) if overrides is not None else {}, **status})

    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j["values"] if k not in keys]
    swept = [k for k in keys if len({json.dumps(j["values"].get(k), sort_keys=True, default=str) for j in jobs}) > 1]
    if not swept:  # a one-job sweep, or every job alike: show what the sweep declared
        swept = [k for k in declared if k in keys]

    summary_rows = []
    conditions: list[str] = []
    baseline = None
    for j in jobs:
        if j["dir"] is None or not (j["dir"] / "summary.csv").is_file():
            continue
        s = pd.read_csv(j["dir"] / "summary.csv")
        for r in s.to_dict(orient="records"):
            if r["condition"] not in conditions:
                conditions.append(r["condition"])
            if str(r.get("is_baseline")) == "True" or r.get("verdict") == "baseline":
                baseline = baseline or r["condition"]
            summary_rows.append({"job": j["job"], **{k: _label(j["values"].get(k)) for k in swept},
                                 "condition": r["condition"], "n": r.get("n"), "mean_nll": r.get("mean"),
                                 **{c: r.get(c) for c in SUMMARY_COLUMNS[3:]}})
    summary = pd.DataFrame(summary_rows, columns=["job", *swept, *SUMMARY_COLUMNS])
    jobs_df = pd.DataFrame([{"job": j["job"], **{k: _label(j["values"].get(k)) for k in swept},
                             "status": j["status"], "score_lines": j["score_lines"], "error_type": j["error_type"],
                             "error_message": j["error_message"]} for j in jobs],
                           columns=["job", *swept, "status", "score_lines", "error_type", "error_message"])

    write_atomic(sweep_dir / "sweep_summary.csv", summary.to_csv(index=False))
    write_atomic(sweep_dir / "jobs.csv", jobs_df.to_csv(index=False))

    numeric_key = None
    if len(swept) == 1 and jobs and all(_is_number(j["values"].get(swept[0])) for j in jobs
                                        if j["status"] == "complete"):
        numeric_key = swept[0]
    figure = None
    treated = [c for c in conditions if c != baseline]
    if len(summary) and treated:
        figure = _figure(jobs, summary_rows, treated, swept, numeric_key, baseline, sweep_dir / "sweep_effect.png")

    failed = [{"job": j["job"], "dir": str(j["dir"]) if j["dir"] else None, "type": j["error_type"],
               "message": j["error_message"]} for j in jobs if j["status"] == "failed"]
    counts = {s: sum(j["status"] == s for j in jobs) for s in STATUSES}
    resume_cmd = None
    if task is not None and (failed or any(j["status"] != "complete" for j in jobs)):
        kept = [t for t in task if t.split("=", 1)[0] != "resume"]
        resume_cmd = " ".join(["kvprime run -m", *map(shlex.quote, kept), shlex.quote(f"hydra.sweep.dir={sweep_dir}"),
                               "resume=true"])
    unchanged = untouched_conditions(jobs)
    md = _markdown(sweep_dir, jobs_df, summary, swept, counts, failed, figure, baseline, resume_cmd)
    if unchanged:
        md += ("\n## Conditions the sweep does not touch\n\nRe-run in every job with the same definition, model "
               "and data; their per-sample NLLs are compared across jobs (they must agree up to float rounding).\n\n"
               + markdown_table([[u["condition"], ", ".join(map(str, u["jobs"])), u["samples"], u["max_abs_diff"]]
                                 for u in unchanged],
                                ["condition", "jobs", "samples compared", "max abs NLL difference"],
                                formats={"max abs NLL difference": ".2e"}) + "\n")
    write_atomic(sweep_dir / "sweep_report.md", md)
    write_atomic(sweep_dir / html.SWEEP_PAGE, html.render_sweep(
        sweep_dir, jobs=[{**j, "values": {k: _label(j["values"].get(k)) for k in swept},
                          "overrides": " ".join(f"{k}={_label(v)}" for k, v in j["values"].items())} for j in jobs],
        swept=swept, summary=summary, baseline=baseline, counts=counts, failed=failed, figure=figure,
        resume_cmd=resume_cmd, unchanged=unchanged))
    result = {"sweep_dir": str(sweep_dir), "swept_keys": swept, "baseline": baseline, "counts": counts,
              "jobs": [{k: (str(v) if isinstance(v, Path) else v) for k, v in j.items()} for j in jobs],
              "summary": summary.to_dict(orient="records"), "failed": failed, "untouched_conditions": unchanged,
              "files": {"summary": "sweep_summary.csv", "jobs": "jobs.csv", "figure": figure,
                        "report": "sweep_report.md", "page": html.SWEEP_PAGE}}
    write_json(sweep_dir / "sweep_report.json", result)
    return result


_NOT_SCORING = ("conditions", "condition", "resume", "progress", "batch", "run", "experiment", "hydra")


def untouched_conditions(jobs) -> list[dict]:
    """Conditions defined identically in several complete jobs that also share model, data and seed: the
    sweep did not touch them, so their per-sample NLLs must agree across those jobs. Returns, per such
    condition and group of jobs, the largest absolute NLL difference found."""
    groups: dict = {}
    for j in jobs:
        d = j["dir"]
        if j["status"] != "complete" or d is None or not (d / "plan.json").exists():
            continue
        cfg = json.loads((d / "config.json").read_text())
        setting = json.dumps({k: v for k, v in cfg.items() if k not in _NOT_SCORING}, sort_keys=True)
        for name, spec in json.loads((d / "plan.json").read_text())["conditions"].items():
            groups.setdefault((name, setting, json.dumps(spec, sort_keys=True)), []).append(j)
    out = []
    for (name, _, _), members in groups.items():
        if len(members) < 2:
            continue
        per_job = []
        for j in members:
            rows = [json.loads(line) for line in (j["dir"] / "scores.jsonl").read_text().splitlines() if line]
            per_job.append({r["sample_id"]: r["nll"] for r in rows if r["condition"] == name})
        common = set.intersection(*(set(p) for p in per_job))
        diffs = [abs(p[sid] - per_job[0][sid]) for p in per_job[1:] for sid in common
                 if p[sid] is not None and per_job[0][sid] is not None]
        out.append({"condition": name, "jobs": [j["job"] for j in members], "samples": len(common),
                    "max_abs_diff": max(diffs, default=0.0)})
    return sorted(out, key=lambda u: (u["condition"], u["jobs"]))


def _figure(jobs, rows, treated, swept, numeric_key, baseline, path: Path) -> str | None:
    # lazy: matplotlib; only a sweep's report draws, not the commands that import this module (report, merge)
    from matplotlib.figure import Figure

    from ..reporting.figures import save_figure

    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(0.0, color="#555555", lw=0.8)
    by = {(r["job"], r["condition"]): r for r in rows}
    done = [j for j in jobs if any((j["job"], c) in by for c in treated)]
    if not done:
        return None

    def err(r):
        lo, hi, m = r.get("ci_low"), r.get("ci_high"), r.get("mean_delta")
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (lo, hi, m)):
            return 0.0, 0.0
        return max(m - lo, 0.0), max(hi - m, 0.0)

    if numeric_key is not None:
        values = [j["values"][numeric_key] for j in done]
        span = (max(values) - min(values)) or 1.0
        for i, c in enumerate(treated):
            pts = sorted(((j["values"][numeric_key], by[(j["job"], c)]) for j in done if (j["job"], c) in by),
                         key=lambda p: p[0])
            dodge = 0.008 * span * (i - (len(treated) - 1) / 2)  # conditions at one x side by side
            xs = [x + dodge for x, _ in pts]
            ys = [r["mean_delta"] for _, r in pts]
            e = np.array([err(r) for _, r in pts]).T
            ax.errorbar(xs, ys, yerr=e, marker="o", capsize=3, label=c)
        ax.set_xlabel(numeric_key)
    else:
        width = 0.8 / len(treated)
        x = np.arange(len(done))
        for i, c in enumerate(treated):
            rs = [by.get((j["job"], c)) for j in done]
            ys = [r["mean_delta"] if r else np.nan for r in rs]
            e = np.array([err(r) if r else (0.0, 0.0) for r in rs]).T
            ax.bar(x - 0.4 + width * (i + 0.5), ys, width, yerr=e, capsize=3, label=c)
        labels = []
        for j in done:
            parts = [_label(j["values"].get(k)) for k in swept] or [f"job {j['job']}"]
            text = ", ".join(parts)
            labels.append(f"{j['job']}: " + (text if len(text) <= 40 else text[:37] + "..."))
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_xlabel(", ".join(swept) if swept else "job")
    ax.set_ylabel(f"mean delta vs {baseline} (NLL; > 0: better)")
    ax.set_title("Sweep: mean delta with 95% CI per job")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path).name


def _markdown(sweep_dir, jobs_df, summary, swept, counts, failed, figure, baseline, resume_cmd) -> str:
    out = [f"# Sweep report: {sweep_dir.name}", "",
           f"Sweep directory: `{sweep_dir}`", "",
           f"Swept: {', '.join(f'`{k}`' for k in swept) or '(nothing varies between the jobs)'}. "
           f"Baseline: `{baseline}`. Jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", ""]
    if failed:
        out += ["## Failed jobs", ""]
        out += [f"- job {f['job']}: **{f['type']}**: {f['message']}" for f in failed]
        out += [""]
    if resume_cmd:
        out += [("After fixing what made jobs fail, rerun the same sweep into the same directory (finished jobs are "
                 "not rescored; a partial job continues where it stopped):"), "", "```", resume_cmd, "```", ""]
    out += ["## Jobs", "", markdown_table(jobs_df.drop(columns=["error_message"])), ""]
    out += ["## Results per job and condition", "",
            ("delta = baseline NLL - condition NLL (positive: the condition is better); CI: 95% bootstrap; "
             "p_holm within each job."), ""]
    out += [markdown_table(summary) if len(summary) else "(no job has results yet)", ""]
    if figure:
        out += ["## Effect", "", f"![mean delta per job]({figure})", ""]
    return "\n".join(out)
