"""The Hydra application behind ``kvprime run`` (also ``python -m kvprime.app``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
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

    try:
        results = run_experiment(cfg, run_dir, only=only)
    except USER_ERRORS as err:
        _drop_if_empty(run_dir)
        if debug():
            raise
        print(explain(err), file=sys.stderr)
        raise SystemExit(2) from None
    _print_summary(results)
    print(f"kvprime: wrote {run_dir.resolve()}/report.md", file=sys.stderr)


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
