"""Sharded runs merged back into one, sweep reports over Hydra multiruns, the launcher plugins, and what a
sweep does when one of its jobs fails (tiny random model, a 6-sample JSONL file)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fixtures import cli
from fixtures.jsonl import write_jsonl

from kvprime.config.compose import compose
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import plan, runner
from kvprime.scaleout.merge import MergeError, expand_run_dirs, merge_runs
from kvprime.scaleout.sweep import is_sweep_dir, job_dirs, sweep_report

TINY = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false"]


def _samples(path: Path, n: int = 7) -> Path:
    """n usable samples of different lengths (so batches pad) and one rejected record."""
    rows = [{"id": f"s{i}", "passage": " ".join(f"The river number {i} flows through the city {j} of France and into "
                                                f"the sea." for j in range(1 + (3 * i) % 4)),
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(n)]
    rows.insert(3, {"id": "empty", "passage": "A passage whose answer is missing.", "query": "What?", "answer": " "})
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return _samples(tmp_path_factory.mktemp("data") / "samples.jsonl")


def _cfg(data_file, *extra):
    return compose([*TINY, "dataset=jsonl", f"dataset.path={data_file}", *extra])


# ---------------------------------------------------------------------------------------------- merge

def _run_sharded(root, data_file, *extra):
    runner.run_experiment(_cfg(data_file, *extra), root / "whole")
    for i in range(3):
        runner.run_experiment(_cfg(data_file, *extra, "run.num_shards=3", f"run.shard={i}"), root / f"shard{i}")
    return root


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data_file):
    """exp21 (random-query control included) run whole and in 3 shards of a 7-sample selection (3/2/2), one
    sample per batch: batching then groups the same samples in both, and the numbers are equal bit for bit."""
    return _run_sharded(tmp_path_factory.mktemp("shards"), data_file, "batch.samples=1")


@pytest.mark.parametrize("samples_per_batch", [1, 2])
def test_three_shards_merged_equal_one_unsharded_run(sharded, tmp_path, data_file, samples_per_batch):
    """One sample a batch (the shared shards) or two (batch.samples=2: shards are dealt whole batching chunks, so
    each batches exactly the samples the one-job run batches together): the merge equals that run byte for byte."""
    root = sharded if samples_per_batch == 1 else _run_sharded(tmp_path, data_file, "batch.samples=2")
    shards = [root / f"shard{i}" for i in (2, 0, 1)]  # any order
    assert [len(read_jsonl(root / f"shard{i}" / "inputs.jsonl")) for i in range(3)] == [3, 2, 2]
    out = tmp_path / "merged"
    results = merge_runs(shards, out)
    whole = root / "whole"
    key = ["sample_id", "condition"]
    a = pd.read_csv(out / "scores.csv").sort_values(key).reset_index(drop=True)
    b = pd.read_csv(whole / "scores.csv").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert (out / "scores.csv").read_bytes() == (whole / "scores.csv").read_bytes()  # same order too
    assert (out / "summary.csv").read_bytes() == (whole / "summary.csv").read_bytes()
    assert (out / "comparisons.csv").read_bytes() == (whole / "comparisons.csv").read_bytes()
    assert read_jsonl(out / "inputs.jsonl") == read_jsonl(whole / "inputs.jsonl")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"] == {"num_shards": 1, "shard": 0}
    meta, meta_whole = (json.loads((d / "metadata.json").read_text()) for d in (out, whole))
    assert meta["model_encodes"] == meta_whole["model_encodes"] == 7 * 3
    assert meta["dataset"]["sample_ids_sha256"] == meta_whole["dataset"]["sample_ids_sha256"]
    assert [s["shard"] for s in meta["merged_from"]["shards"]] == [0, 1, 2]
    assert meta["merged_from"]["selection_check"] == "equal to the dataset's selection"
    assert meta["merged_from"]["exact_vs_unsharded"] is True
    assert results["merge"]["n_samples"] == 7 and results["counts"]["score_lines"] == 7 * 5
    assert json.loads((out / "inspect.json").read_text()) == json.loads((whole / "inspect.json").read_text())


def test_merge_refuses_a_missing_shard(sharded, tmp_path):
    with pytest.raises(MergeError, match=r"missing shards: 1 of run.num_shards=3"):
        merge_runs([sharded / "shard0", sharded / "shard2"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_duplicated_shard(sharded, tmp_path):
    copy = tmp_path / "shard1_again"
    shutil.copytree(sharded / "shard1", copy)
    with pytest.raises(MergeError, match=r"duplicate shards: shard 1 of 3 given 2 times"):
        merge_runs([sharded / "shard0", sharded / "shard1", copy, sharded / "shard2"], tmp_path / "m")


def test_merge_refuses_duplicated_samples_and_scores(sharded, tmp_path):
    # A shard whose inputs/scores also hold a sample of another shard.
    bad = tmp_path / "shard1_bad"
    shutil.copytree(sharded / "shard1", bad)
    foreign = read_jsonl(sharded / "shard0" / "inputs.jsonl")[0]
    with open(bad / "inputs.jsonl", "a") as fh:
        fh.write(json.dumps(foreign) + "\n")
    sid = foreign["sample_id"]
    with pytest.raises(MergeError, match=rf"appear in more than one shard.*'{sid}' in shards \[0, 1\]"):
        merge_runs([sharded / "shard0", bad, sharded / "shard2"], tmp_path / "m")
    # A score line repeated within a shard.
    bad2 = tmp_path / "shard2_bad"
    shutil.copytree(sharded / "shard2", bad2)
    line = (bad2 / "scores.jsonl").read_text().splitlines()[0]
    with open(bad2 / "scores.jsonl", "a") as fh:
        fh.write(line + "\n")
    with pytest.raises(MergeError, match=r"score \('s\d', 'bare'\) duplicated \(shards 2 and 2\)"):
        merge_runs([sharded / "shard0", sharded / "shard1", bad2], tmp_path / "m2")
    # A missing score line.
    bad3 = tmp_path / "shard0_bad"
    shutil.copytree(sharded / "shard0", bad3)
    lines = (bad3 / "scores.jsonl").read_text().splitlines(keepends=True)
    (bad3 / "scores.jsonl").write_text("".join(lines[:-1]))
    with pytest.raises(MergeError, match=r"1 score\(s\) missing, e.g. \('s\d', 'truncated_random'\)"):
        merge_runs([bad3, sharded / "shard1", sharded / "shard2"], tmp_path / "m3")


def test_merge_names_what_differs(sharded, tmp_path, data_file):
    other = tmp_path / "other_seed"
    shutil.copytree(sharded / "shard1", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["seed"], cfg["stats"]["n_boot"] = 7, 999
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"configs differ in seed, stats.n_boot \(only run.shard"):
        merge_runs([sharded / "shard0", other, sharded / "shard2"], tmp_path / "m")
    model = tmp_path / "other_model"
    shutil.copytree(sharded / "shard1", model)
    meta = json.loads((model / "metadata.json").read_text())
    meta["model"]["weights_sha256"] = "0" * 64
    (model / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(MergeError, match=r"scored with different models"):
        merge_runs([sharded / "shard0", model, sharded / "shard2"], tmp_path / "m2")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(sharded / "shard1", unfinished)
    (unfinished / "metadata.json").unlink()
    with pytest.raises(MergeError, match=r"metadata.json is missing; the shard has not finished"):
        merge_runs([sharded / "shard0", unfinished, sharded / "shard2"], tmp_path / "m3")


# ------------------------------------------------------------------------------------ sweep configs

def test_sweep_experiments_declare_their_sweeps():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from kvprime.config.confdir import CONF_DIR

    def jobs(name):
        params = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        return [j[0].split("=", 1) for j in BasicSweeper.split_arguments(parsed, None)[0]]

    offsets = jobs("offset_sweep")
    assert [k for k, _ in offsets] == ["conditions.baseline_offset.position_offset"] * 6
    assert [v for _, v in offsets] == ["0", "5", "10", "20", "50", "100"]
    templates = jobs("prefix_sweep")
    assert {k for k, _ in templates} == {"conditions.primed.prefix_template"}
    # Each job gets one single-quoted Hydra string holding real newlines (not backslash-n).
    values = [OverridesParser.create().parse_override(f"x={v}").value() for _, v in templates]
    assert values == ["This document may be relevant to queries like: {surrogate}\n\n", "{surrogate}\n",
                      "Question: {surrogate}\n\n", "Related question: {surrogate}\nDocument follows.\n\n"]
    for name, conds in (("offset_sweep", ["baseline", "baseline_offset", "truncated_query"]),
                        ("prefix_sweep", ["baseline", "primed", "primed_static"])):
        cfg = compose([f"experiment={name}", "model=tiny_random_llama"])
        assert list(plan.plan_conditions(cfg)) == conds
    cfg = compose(["experiment=prefix_sweep", f"conditions.primed.prefix_template='{values[2]}'"])
    specs = plan.plan_conditions(cfg)
    assert specs["primed"].prefix_template == specs["primed_static"].prefix_template == "Question: {surrogate}\n\n"


# ------------------------------------------------------------------------------------ CLI multiruns

def _kvprime(args, tmp_path, env=None, timeout=600):
    full_env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t = time.perf_counter()
    proc = cli.run(["run", "-m", *args], env=full_env, cwd=tmp_path, timeout=timeout)
    proc.wall_s = time.perf_counter() - t
    return proc


def _sweep_args(data, sweep_dir, *extra):
    return ["experiment=offset_sweep", *TINY, "dataset=jsonl", f"dataset.path={data}", "dataset.n_samples=3",
            f"hydra.sweep.dir={sweep_dir}", *extra]


@pytest.mark.integration
def test_offset_sweep_runs_six_jobs_and_reports_them(tmp_path, data_file):
    sweep = tmp_path / "sweep"
    proc = _kvprime(_sweep_args(data_file, sweep), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert is_sweep_dir(sweep) and not is_sweep_dir(sweep / "0")
    assert [d.name for d in job_dirs(sweep)] == [str(i) for i in range(6)]
    report = sweep_report(sweep)
    assert report["swept_keys"] == ["conditions.baseline_offset.position_offset"]
    assert report["counts"]["complete"] == 6 and not report["failed"]
    summary = pd.read_csv(sweep / "sweep_summary.csv")
    assert list(summary.columns) == ["job", "conditions.baseline_offset.position_offset", "condition", "n", "mean_nll",
                                     "mean_delta", "ci_low", "ci_high", "p_holm", "d_z", "verdict"]
    assert len(summary) == 6 * 3
    off = summary[summary.condition == "baseline_offset"]
    assert list(off["conditions.baseline_offset.position_offset"]) == [0, 5, 10, 20, 50, 100]
    assert (off.mean_delta.abs() < 1e-4).all()  # RoPE: an offset cache is the same cache up to rounding
    for d, offset in zip(job_dirs(sweep), [0, 5, 10, 20, 50, 100], strict=True):
        planned = json.loads((d / "plan.json").read_text())["conditions"]
        assert planned["baseline_offset"]["position_offset"] == offset
        rows = {r["condition"]: r for r in read_jsonl(d / "scores.jsonl")[:3]}
        assert rows["baseline_offset"]["next_position"] == rows["baseline"]["next_position"] + offset
    assert (sweep / "sweep_effect.png").stat().st_size > 1000
    # The sweep does not touch baseline and truncated_query: re-run in all 6 jobs and checked identical.
    untouched = {u["condition"]: u for u in report["untouched_conditions"]}
    assert set(untouched) == {"baseline", "truncated_query"}
    assert untouched["baseline"]["jobs"] == list(range(6)) and untouched["baseline"]["samples"] > 0
    assert untouched["baseline"]["max_abs_diff"] <= 1e-6
    md = (sweep / "sweep_report.md").read_text()
    assert "Conditions the sweep does not touch" in md
    assert "![mean delta per job](sweep_effect.png)" in md and "6 complete" in md
    before = {p.name: p.read_bytes() for p in sweep.iterdir() if p.is_file() and p.suffix in (".csv", ".md", ".png")}
    sweep_report(sweep)
    assert before == {p.name: p.read_bytes() for p in sweep.iterdir() if p.name in before}  # same files, same bytes


@pytest.mark.integration
def test_prefix_sweep_passes_templates_with_newlines(tmp_path, data_file):
    sweep = tmp_path / "sweep"
    args = ["experiment=prefix_sweep", *TINY, "dataset=jsonl", f"dataset.path={data_file}", "dataset.n_samples=2",
            f"hydra.sweep.dir={sweep}"]
    proc = _kvprime(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = ["This document may be relevant to queries like: {surrogate}\n\n", "{surrogate}\n",
            "Question: {surrogate}\n\n", "Related question: {surrogate}\nDocument follows.\n\n"]
    for d, template in zip(job_dirs(sweep), want, strict=True):
        planned = json.loads((d / "plan.json").read_text())["conditions"]
        assert planned["primed"]["prefix_template"] == planned["primed_static"]["prefix_template"] == template
    report = sweep_report(sweep)
    assert report["swept_keys"] == ["conditions.primed.prefix_template"] and report["counts"]["complete"] == 4
    jobs = pd.read_csv(sweep / "jobs.csv")
    assert list(jobs["conditions.primed.prefix_template"])[1] == "{surrogate}\\n"  # one line, \n visible
    assert (sweep / "sweep_effect.png").exists()  # a grouped bar chart: the swept value is not a number


def _has_plugin(name):
    import importlib.util

    return importlib.util.find_spec(f"hydra_plugins.{name}") is not None


def _needs(plugin):
    return pytest.mark.skipif(not _has_plugin(plugin), reason=f"{plugin.replace('_', '-')} is not installed")


@pytest.mark.integration
@pytest.mark.parametrize("launcher", [
    pytest.param("joblib", marks=_needs("hydra_joblib_launcher")),
    pytest.param("submitit_local", marks=_needs("hydra_submitit_launcher")),
    # hydra-ray-launcher pins cloudpickle<3, which joblib>=1.6 refuses: tested in an environment of its own.
    pytest.param("ray", marks=_needs("hydra_ray_launcher")),
])
def test_launcher_plugin_runs_a_two_job_sweep(tmp_path, data_file, launcher):
    sweep = tmp_path / "sweep"
    proc = _kvprime(_sweep_args(data_file, sweep, f"hydra/launcher={launcher}",
                                "conditions.baseline_offset.position_offset=0,7"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = sweep_report(sweep)
    assert report["counts"]["complete"] == 2
    assert [j["values"]["conditions.baseline_offset.position_offset"] for j in report["jobs"]] == [0, 7]
    if launcher == "submitit_local":
        assert (sweep / ".submitit").is_dir()  # submitit's own logs, beside the jobs; not a job
    assert len(pd.read_csv(sweep / "sweep_summary.csv")) == 2 * 3


@pytest.mark.integration
@_needs("hydra_submitit_launcher")
def test_slurm_gpu_launcher_config_reaches_sbatch(tmp_path, data_file):
    """hydra/launcher=slurm_gpu through submitit's Slurm executor up to sbatch (fake sbatch/srun on PATH)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {fake}/submitted.sh\necho 'Submitted batch job 4242'\n")
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "sacct").write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "KVPRIME_OUTPUT_ROOT": str(tmp_path / "o")}
    args = _sweep_args(data_file, tmp_path / "sweep", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100",
                       "conditions.baseline_offset.position_offset=0,7")
    proc = subprocess.Popen([sys.executable, "-m", "kvprime", "run", "-m", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (fake / "submitted.sh").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
    finally:
        proc.kill()  # it would wait for the (fake) Slurm jobs forever
        proc.wait()
    script = (fake / "submitted.sh").read_text()
    for line in ("--array=0-1", "--partition=a100", "--gpus-per-task=1", "--cpus-per-task=8", "--mem=64GB",
                 "--time=240", "--job-name=kvprime"):
        assert f"#SBATCH {line}" in script, line


# ------------------------------------------------------------------------------------------ failures

@pytest.mark.integration
def test_failed_job_is_reported_and_a_resumed_sweep_runs_only_what_is_missing(tmp_path, data_file):
    """Two of four jobs get a data file that is not there yet: Hydra's basic launcher still runs every job,
    then exits 1. The sweep report names the jobs and the error; once the file exists, the same sweep with
    resume=true scores only those jobs and leaves the finished jobs' scores untouched."""
    sweep = tmp_path / "sweep"
    late = tmp_path / "late.jsonl"
    # Jobs in Hydra's order: the experiment's sweeper.params key first, then the command line's.
    args = _sweep_args(f"{data_file},{late}", sweep, "conditions.baseline_offset.position_offset=0,3")
    proc = _kvprime(args, tmp_path)
    assert proc.returncode == 2  # a missing data file is the user's to fix: one paragraph per job, no traceback
    assert "Error executing job with overrides" in proc.stderr and "JSONL dataset file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    report = sweep_report(sweep)
    assert report["swept_keys"] == ["conditions.baseline_offset.position_offset", "dataset.path"]
    jobs = [(j["values"]["conditions.baseline_offset.position_offset"], j["values"]["dataset.path"], j["status"])
            for j in report["jobs"]]
    assert jobs == [(0, str(data_file), "complete"), (0, str(late), "failed"),
                    (3, str(data_file), "complete"), (3, str(late), "failed")]  # a failure does not stop the sweep
    assert [f["job"] for f in report["failed"]] == [1, 3]
    assert report["failed"][0]["type"] == "MissingFileError" and str(late) in report["failed"][0]["message"]
    md = (sweep / "sweep_report.md").read_text()
    assert "## Failed jobs" in md and "job 1: **MissingFileError**" in md and "resume=true" in md
    assert list(pd.read_csv(sweep / "jobs.csv").status) == ["complete", "failed", "complete", "failed"]
    done = {n: (job_dirs(sweep)[n] / "scores.jsonl").stat().st_mtime_ns for n in (0, 2)}
    meta = {n: (job_dirs(sweep)[n] / "metadata.json").read_bytes() for n in (0, 2)}

    _samples(late, n=4)
    proc = _kvprime([*args, "resume=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = sweep_report(sweep)
    assert report["counts"]["complete"] == 4 and not report["failed"]
    for n in (1, 3):
        assert not (job_dirs(sweep)[n] / "error.json").exists()
        assert len(read_jsonl(job_dirs(sweep)[n] / "scores.jsonl")) == 3 * 3
    for n in (0, 2):  # finished jobs: finalized again, not rescored
        assert (job_dirs(sweep)[n] / "scores.jsonl").stat().st_mtime_ns == done[n]
        assert (job_dirs(sweep)[n] / "metadata.json").read_bytes() == meta[n]
    assert "resume=true" not in (sweep / "sweep_report.md").read_text()


@pytest.mark.integration
def test_invalid_value_fails_only_its_job(tmp_path, data_file):
    sweep = tmp_path / "sweep"
    proc = _kvprime(_sweep_args(data_file, sweep, "conditions.baseline_offset.position_offset=0,-1,5"), tmp_path)
    assert proc.returncode == 2  # a bad value is the user's: a paragraph per job, exit 2
    report = sweep_report(sweep)
    assert [j["status"] for j in report["jobs"]] == ["complete", "failed", "complete"]
    assert report["failed"][0]["type"] == "ConfigError"
    assert "position_offset must be a non-negative integer, got -1" in report["failed"][0]["message"]
    assert (sweep / "sweep_effect.png").exists()  # numeric: the two finished offsets


def test_sweep_report_statuses_without_running(tmp_path):
    """partial (killed mid-run), missing-results (nothing written) and not-started (a later batch) jobs."""
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    for n, files in ((0, {"scores.jsonl": '{"sample_id": "a", "condition": "bare", "nll": 1.0}\n{"sampl'}),
                     (1, {})):
        d = sweep / str(n)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- seed={n + 1}\n- experiment=exp21\n")
        for name, text in files.items():
            (d / name).write_text(text)
    OmegaConf.save(OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["seed=1,2,3", "experiment=exp21"], "hydra": ["hydra.mode=MULTIRUN"]}}}),
        sweep / "multirun.yaml")
    report = sweep_report(sweep)
    assert [(j["job"], j["values"]["seed"], j["status"]) for j in report["jobs"]] == \
        [(0, 1, "partial"), (1, 2, "missing-results"), (2, 3, "not-started")]
    assert report["swept_keys"] == ["seed"] and report["files"]["figure"] is None
    assert "kvprime run -m seed=1,2,3 experiment=exp21" in (sweep / "sweep_report.md").read_text()
    assert expand_run_dirs([sweep]) == [sweep / "0", sweep / "1"]
    with pytest.raises(FileNotFoundError, match="not a Hydra sweep directory"):
        sweep_report(sweep / "0")


def test_merge_keeps_the_worst_numerical_floor_of_its_shards(sharded, tmp_path):
    import shutil

    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard{i}")
        shutil.copytree(sharded / f"shard{i}", shards[-1])
    meta_path = shards[1] / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta["numerical_floor"]["measured"]  # exp21's truncated conditions re-rotate
    meta["numerical_floor"] = {**meta["numerical_floor"], "max_nll_abs_diff": 5e-3}  # as if scored elsewhere
    meta_path.write_text(json.dumps(meta))
    results = merge_runs(shards, tmp_path / "merged")
    assert results["metadata"]["numerical_floor"]["max_nll_abs_diff"] == 5e-3
    # stats.tie_tolerance=auto follows the worst floor: rounding on any shard's machine is a tie
    assert results["statistics"]["tie_tolerance"] == 5e-3
