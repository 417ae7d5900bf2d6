"""The Hydra application behind ``kvprime run`` (also ``python -m kvprime.commands.app``).

Hydra composes the config and picks the directory; everything that touches the directory is kvprime's:
``conf/config.yaml`` sets ``hydra.output_subdir: null`` so Hydra writes nothing there, and kvprime writes
Hydra's record (``.hydra/``) itself once the run holds the directory's lock, so a refused run changes nothing
in a directory that holds another run. Every job ends in one of three ways, each with one paragraph on the
terminal: done (exit 0), refused or stopped by the user (2, or 130/143/140 after a signal), or failed inside
kvprime (1, the traceback saved to the run's ``error.json``, or to a file named in the paragraph).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .. import tracking
from ..config.confdir import CONF_DIR, outputs_root, register_resolvers
from ..errors import (
    Interrupted,
    KvprimeError,
    debug,
    explain,
    explain_internal,
    save_traceback,
    traceback_text,
)
from ..files import rundir
from ..files.results_io import read_jsonl, write_atomic, write_json
from ..pipeline import logs
from ..pipeline.interrupts import StopSignal, stop_on_signals
from ..pipeline.runner import RUN_FILES, run_experiment
from ..reporting.report import rejection_counts
from . import hydra_bridge
from .failures import report_failure

register_resolvers()  # before Hydra resolves hydra.run.dir

log = logging.getLogger("kvprime")
COMMAND = "kvprime run"


class JobFailed(Exception):
    """A multirun job failed; its paragraph is already on the terminal and in its error.json."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(code, message)
        self.code = code

    def __str__(self) -> str:
        return self.args[1] or f"exit status {self.code}"


def job(cfg: DictConfig, argv: list[str]) -> int:
    """One job Hydra composed (a run, or one job of a multirun): its exit status. A failed multirun job raises
    ``JobFailed`` so that Hydra stops the sweep, as it stops on any job's error."""
    hc = HydraConfig.get()
    only = hc.runtime.choices.get("condition")
    only = None if only in (None, "null") else only
    multirun = hc.mode == RunMode.MULTIRUN
    # A researcher's plugin modules may sit beside their configs (--config-dir, hydra.searchpath).
    config_dirs = [s.path for s in hc.runtime.config_sources if s.schema == "file" and s.provider != "main"]
    with rundir.created_scope():  # ``kvprime run``'s own, or this process's where a launcher started it
        code, paragraph = run_job(cfg, Path(hc.runtime.output_dir), only=only, multirun=multirun,
                                  plugin_dirs=config_dirs, argv=argv)
    if code and multirun:
        raise JobFailed(code, paragraph)
    return code


def run_job(cfg: DictConfig, run_dir: Path, *, only: str | None, multirun: bool, plugin_dirs=(),
            argv: list[str] | None = None) -> tuple[int, str]:
    """One run into ``run_dir``: (exit status, the paragraph printed when it did not succeed). ``plugin_dirs``:
    where its plugins are looked for besides the current directory; ``argv``: the command line its metadata
    records."""
    log.info(f"kvprime: run directory {run_dir.resolve()}")
    claimed: dict = {"files": None, "latest": None, "outcome": None}

    def on_claimed(d: Path) -> None:
        claimed["files"] = {p.name for p in d.iterdir()}  # what was there before this run wrote anything
        _write_hydra_record(d, cfg)
        if rundir.created_here(d):
            claimed["latest"] = (rundir.point_latest(d),)
        logs.attach_run_log(d)

    def on_failure(err: BaseException) -> None:  # called while the run still holds the directory's lock
        claimed["outcome"] = _settle(run_dir, err, ours=True, multirun=multirun, claimed=claimed)

    try:
        tracking.require(cfg)  # a tracker that cannot be imported stops the run before anything loads
        with stop_on_signals():
            results = run_experiment(cfg, run_dir, only=only, on_claimed=on_claimed, on_failure=on_failure,
                                     condition_selected=only is not None, plugin_dirs=plugin_dirs, command=argv)
    except BaseException as err:  # noqa: BLE001 -- every way a job ends is reported below
        outcome = claimed["outcome"] or _settle(run_dir, err, ours=False, multirun=multirun, claimed=claimed)
        code, paragraph, undone = outcome
        log.error(paragraph)
        logs.detach_run_log()
        if undone or (claimed["files"] is None and not multirun):
            rundir.remove_created(run_dir, drop_lock_file=undone)
        return code, paragraph
    _print_summary(results)
    log.info(f"kvprime: wrote {run_dir.resolve()}/report.md")
    code, paragraph = _track(run_dir, multirun)
    logs.detach_run_log()
    return code, paragraph


def _track(run_dir: Path, multirun: bool) -> tuple[int, str]:
    """Log the finished run to its tracker (tracking=...), a multirun job under its sweep's parent run: (exit
    status, the paragraph printed when it could not be logged; the run directory is complete either way)."""
    try:
        logged = tracking.log_run(run_dir, sweep_dir=run_dir.parent if multirun else None)
    except KvprimeError as err:
        paragraph = explain(err)
        log.error(paragraph)
        return err.exit_code, paragraph
    if logged:
        log.info(f"kvprime: logged to {logged}")
    return 0, ""


def _settle(run_dir: Path, err: BaseException, *, ours: bool, multirun: bool, claimed: dict) -> tuple[int, str, bool]:
    """What a failed job says and leaves behind: (exit status, paragraph, whether its files were undone).
    ``ours``: the job holds the directory (it claimed it and has not released it)."""
    if isinstance(err, StopSignal):
        err = _interrupted(run_dir, err.signum, ours=ours)
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        raise err
    undone = False
    if isinstance(err, KvprimeError):
        paragraph = explain(err)
        scored = ours and (run_dir / "scores.jsonl").exists() and (run_dir / "scores.jsonl").stat().st_size > 0
        if ours and not scored and not multirun and not isinstance(err, Interrupted):
            _undo(run_dir, claimed["files"], RUN_FILES)  # refused before any score: leave nothing behind
            if claimed["latest"] is not None:
                rundir.restore_latest(run_dir, claimed["latest"][0])
            undone = True
        elif ours or multirun:
            _record_failure(run_dir, err, paragraph, internal=False, claimed=ours)
        if debug() and not isinstance(err, Interrupted):
            print(traceback_text(err), file=sys.stderr)
        return err.exit_code, paragraph, undone
    saved = run_dir / "error.json" if ours else save_traceback(err)
    paragraph = explain_internal(err, saved)
    if ours or multirun:
        _record_failure(run_dir, err, paragraph, internal=True, claimed=ours)
    if debug():
        print(traceback_text(err), file=sys.stderr)
    return 1, paragraph, undone


def _interrupted(run_dir: Path, signum: int, *, ours: bool) -> Interrupted:
    """How far the run got, from its own files, and how to continue (``ours``: it had claimed ``run_dir``;
    before that, the directory's files are not this run's)."""
    done = total = None
    try:
        log_path = run_dir / "scores.jsonl"
        rows = read_jsonl(log_path, skip_torn=True) if log_path.exists() else []
        done = len({(r["sample_id"], r["condition"]) for r in rows})
        n_conditions = len(json.loads((run_dir / "plan.json").read_text())["conditions"])
        total = len(read_jsonl(run_dir / "inputs.jsonl")) * n_conditions
    except (OSError, ValueError, KeyError):
        pass
    name = signal.Signals(signum).name
    if not ours or not (run_dir / "config.json").exists():
        return Interrupted(f"interrupted ({name}) before the run wrote any score; nothing to continue. Start it "
                           "again.", signum)
    of = f" of {total}" if total else ""
    return Interrupted(f"interrupted ({name}) after {done}{of} score records; continue with `kvprime resume "
                       f"{run_dir.resolve()}`", signum)


def _write_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's own record of the run (the job's config, Hydra's config, the overrides), written once, when
    the run starts: a resumed run keeps the record of the command that started it."""
    record = run_dir / ".hydra"
    if (record / "overrides.yaml").exists():
        return
    hc = HydraConfig.get()
    write_atomic(record / "config.yaml", OmegaConf.to_yaml(cfg))
    write_atomic(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
    write_atomic(record / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))))


def _undo(run_dir: Path, before: set[str], run_files) -> None:
    """Remove what this run wrote into ``run_dir`` (it held no run before: ``before`` has no run files). The
    directory itself goes once the lock is released (``rundir.remove_created``), if this process made it."""
    for name in (*run_files, ".hydra", logs.RUN_LOG, "error.json", "inspect.json"):
        if name in before:
            continue
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _record_failure(run_dir: Path, err: BaseException, paragraph: str, *, internal: bool, claimed: bool) -> None:
    """error.json beside the job's partial results: what the terminal said, and the traceback. A sweep job
    refused before it claimed its directory writes one too (a sweep report lists it), unless the directory
    holds another run or another writer."""
    record = {"type": type(err).__name__, "message": str(err), "internal": internal, "paragraph": paragraph,
              "traceback": traceback_text(err)}
    try:
        if claimed:
            write_json(run_dir / "error.json", record)
        elif run_dir.is_dir() and not any((run_dir / f).exists() for f in RUN_FILES):
            with rundir.RunLock(run_dir, "run"):
                write_json(run_dir / "error.json", record)
    except (OSError, KvprimeError):  # a full disk, another writer: the terminal paragraph is all there is
        pass


def _print_summary(results: dict) -> None:
    """The summary table, on stdout (``kvprime.summary``) and in run.log."""
    out = logging.getLogger("kvprime.summary")
    rows = results["summary"]
    w = max(len("condition"), *(len(r["condition"]) for r in rows)) + 2
    lines = [f"\n{results['experiment']['name']}: {results['counts']['scored_samples']} samples, "
             f"baseline {results['experiment']['baseline']!r} (delta > 0: condition better)",
             f"{'condition':<{w}}{'mean NLL':>10}{'delta':>10}{'95% CI':>22}{'win':>7}{'p_holm':>10}  verdict"]
    for r in rows:
        if r["verdict"] == "baseline":
            lines.append(f"{r['condition']:<{w}}{r['mean']:>10.4f}{'':>10}{'':>22}{'':>7}{'':>10}  baseline")
            continue
        ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        lines.append(f"{r['condition']:<{w}}{r['mean']:>10.4f}{r['mean_delta']:>+10.4f}{ci:>22}"
                     f"{r['win_rate']:>7.0%}{r['p_holm']:>10.2g}  {r['verdict']}")
    lines += [f"[{d['status']}] {d['text']}" for d in results.get("diagnosis", [])]
    out.info("\n".join(lines + _left_out(results)))


def _left_out(results: dict) -> list[str]:
    """The samples the summary's numbers leave out, counted by reason as report.md counts them: skipped as too
    long (report.md lists each) and records rejected at load (results.json lists each)."""
    lines = []
    skipped, rejected = results.get("skipped") or [], results.get("rejected") or []
    if skipped:
        # A reason's token count differs from sample to sample: masked, one line per reason.
        masked = [{"reason": re.sub(r"\bneeds \d+ tokens", "needs N tokens", s["reason"])} for s in skipped]
        lines.append(f"{len(skipped)} sample{'s' if len(skipped) > 1 else ''} skipped as too long (each listed in "
                     "report.md):")
        lines += [f"  {n} × {reason}" for reason, n in rejection_counts(masked)]
    if rejected:
        lines.append(f"{len(rejected)} record{'s' if len(rejected) > 1 else ''} rejected at load (each listed in "
                     "results.json):")
        lines += [f"  {n} × {reason}" for reason, n in rejection_counts(rejected)]
    return lines


def _override_paths(args) -> dict[str, str]:
    """hydra.run.dir / hydra.sweep.dir given on the command line (without Hydra: for early path checks)."""
    out = {}
    for a in args:
        key, sep, value = a.lstrip("+").partition("=")
        if sep and key in ("hydra.run.dir", "hydra.sweep.dir") and "${" not in value:
            out[key] = value.strip("'\"")
    return out


def run_hydra_app(args: list[str]) -> int:
    """``kvprime run ARGS``: Hydra composes and launches; every outcome becomes an exit status and, unless it
    is success, one paragraph."""
    with rundir.created_scope():  # the directories this call makes, and only those, a refusal removes
        return _launch(args)


def _launch(args: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in args)
    paths = _override_paths(args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    checks = {key: paths[key]} if key in paths else {"KVPRIME_OUTPUT_ROOT (the output root)": outputs_root()}
    for setting, path in checks.items():
        err = rundir.unwritable(Path(path), setting)
        if err is not None:
            return report_failure(err)
    if key in paths:
        rundir.expect_created(Path(paths[key]))  # so a refused run removes only what it made
    logs.quiet_libraries()
    argv = [COMMAND, *args]
    codes: list[int] = []  # this call's jobs' exit statuses (a multirun stops at the first failed one)

    def task(cfg: DictConfig) -> None:  # defined here (in this module): Hydra names the job after its module
        codes.append(job(cfg, argv))

    try:
        # An absolute config path: Hydra resolves a relative one against the launching module.
        hydra_bridge.launch(list(args), task, config_dir=str(CONF_DIR), config_name="config", prog=COMMAND)
    except SystemExit as exc:  # --help, --cfg job, ...
        return exc.code if isinstance(exc.code, int) else 0
    except JobFailed as exc:  # a sweep job failed; its paragraph is printed and in its error.json
        return exc.code
    except BaseException as err:  # noqa: BLE001
        return report_failure(err)
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(run_hydra_app(sys.argv[1:]))
