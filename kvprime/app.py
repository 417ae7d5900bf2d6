"""The Hydra application behind ``kvprime run`` (also ``python -m kvprime.app``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .confdir import CONF_DIR, register_resolvers
from .errors import USER_ERRORS, debug, explain

register_resolvers()  # before Hydra resolves hydra.run.dir


# An absolute path: Hydra resolves a relative one against the launching module, which breaks under `-m`.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    only = hc.runtime.choices.get("condition")
    only = None if only in (None, "null") else only
    print(f"kvprime: run directory {run_dir.resolve()}", file=sys.stderr)
    from .runner import run_experiment

    multirun = hc.mode == RunMode.MULTIRUN
    try:
        results = run_experiment(cfg, run_dir, only=only)
    except BaseException as err:
        # A sweep job keeps its directory and says why it failed (the sweep report lists it); a single run
        # refused before it scored anything leaves nothing behind.
        if multirun or (run_dir / "scores.jsonl").exists():
            _record_failure(run_dir, err)
        else:
            _drop_if_empty(run_dir)
        if multirun or not isinstance(err, USER_ERRORS) or debug():
            raise
        print(explain(err), file=sys.stderr)
        raise SystemExit(2) from None
    (run_dir / "error.json").unlink(missing_ok=True)
    _print_summary(results)
    print(f"kvprime: wrote {run_dir.resolve()}/report.md", file=sys.stderr)


def _record_failure(run_dir: Path, err: BaseException) -> None:
    """error.json beside the job's partial results, so a sweep report can say which job failed and why."""
    import traceback

    from .results_io import write_json

    write_json(run_dir / "error.json", {"type": type(err).__name__, "message": str(err),
                                        "traceback": traceback.format_exc()})


def _drop_if_empty(run_dir: Path) -> None:
    """A run refused before it scored anything leaves no directory behind (Hydra makes it up front)."""
    leftovers = {".hydra", "app.log", "config.json", "plan.json", "main.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= leftovers:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            run_dir.parent.rmdir()  # outputs/<experiment>/ if this was its only run
        except OSError:
            pass


def _print_summary(results: dict) -> None:
    rows = results["summary"]
    w = max(len("condition"), *(len(r["condition"]) for r in rows)) + 2
    print(f"\n{results['experiment']['name']}: {results['counts']['scored_samples']} samples, "
          f"baseline {results['experiment']['baseline']!r} (delta > 0: condition better)")
    print(f"{'condition':<{w}}{'mean NLL':>10}{'delta':>10}{'95% CI':>22}{'win':>7}{'p_holm':>10}  verdict")
    for r in rows:
        if r["verdict"] == "baseline":
            print(f"{r['condition']:<{w}}{r['mean']:>10.4f}{'':>10}{'':>22}{'':>7}{'':>10}  baseline")
            continue
        ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        print(f"{r['condition']:<{w}}{r['mean']:>10.4f}{r['mean_delta']:>+10.4f}{ci:>22}{r['win_rate']:>7.0%}"
              f"{r['p_holm']:>10.2g}  {r['verdict']}")
    for d in results.get("diagnosis", []):
        print(f"[{d['status']}] {d['text']}")


if __name__ == "__main__":
    main()
