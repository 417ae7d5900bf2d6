"""tracking=mlflow: a tiny run logged to a SQLite store and read back through MLflow's own client (params, metrics
equal to summary.csv's, verdict tags, artifacts); a resumed run updates its MLflow run; a 2-job multirun is one
parent run with two children; without mlflow the run stops before any model loads; a store that cannot be written
is one paragraph, the run directory complete."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from kvprime import tracking
from kvprime.commands.app import run_hydra_app

# The test without mlflow runs everywhere; the others need the extra (`.ci/run` installs it).
needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="the optional extra kvprime[mlflow] is not installed "
                                         "(pip install -e '.[mlflow]')")

TINY = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false", "dataset.n_samples=2"]


@pytest.fixture()
def data_file(tmp_path):
    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city and into the sea.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(3)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def common(tmp_path, data_file, monkeypatch):
    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    return [*TINY, "dataset=jsonl", f"dataset.path={data_file}", "tracking=mlflow"]


def _uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _runs(uri: str, experiment: str = "exp21"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client, client.search_runs([found.experiment_id])


def _summary(run_dir) -> dict[str, dict]:
    with (run_dir / "summary.csv").open(newline="") as f:
        return {row["condition"]: row for row in csv.DictReader(f)}


@needs_mlflow
def test_a_tiny_run_is_logged_and_read_back_through_mlflows_client(tmp_path, common, capsys):
    run_dir, uri = tmp_path / "run", _uri(tmp_path)
    assert run_hydra_app([*common, "metrics=[nll,answer]", f"tracking.tracking_uri={uri}",
                          f"hydra.run.dir={run_dir}"]) == 0, capsys.readouterr().err
    client, runs = _runs(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["stats.n_boot"] == "1000" and run.data.params["model.name"] == "tiny_random_llama"
    assert run.data.params["tracking.backend"] == "mlflow"
    summary = _summary(run_dir)
    for condition, row in summary.items():
        assert run.data.metrics[f"{condition}/mean_nll"] == pytest.approx(float(row["mean"]), rel=1e-12)
    assert "bare/mean_delta" not in run.data.metrics  # the baseline has no delta: nothing is logged for it
    assert run.data.metrics["truncated_oracle/ci_low"] == pytest.approx(float(summary["truncated_oracle"]["ci_low"]))
    assert "comparison/truncated_oracle vs truncated_random/p_holm" in run.data.metrics
    assert run.data.metrics["truncated_oracle/f1"] == pytest.approx(float(summary["truncated_oracle"]["f1"]))
    assert {"bare/em", "bare/contains", "comparison/truncated_oracle vs bare/f1_delta"} <= set(run.data.metrics)
    assert run.data.tags["verdict/truncated_oracle"] == summary["truncated_oracle"]["verdict"]
    assert run.data.tags["verdict/bare"] == "baseline"
    assert run.data.tags["kvprime.run_dir"] == str(run_dir.resolve())
    assert "comparison/truncated_oracle vs truncated_random/verdict" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "report.md", "summary.csv", "comparisons.csv", "conditions.png"} <= artifacts
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert "kvprime: logged to mlflow run" in capsys.readouterr().err

    # Resumed once finished (nothing is scored again): the same MLflow run is updated, not a second one made.
    assert run_hydra_app([*common, "metrics=[nll,answer]", f"tracking.tracking_uri={uri}", f"hydra.run.dir={run_dir}",
                          "resume=true"]) == 0
    _, again = _runs(uri)
    assert [r.info.run_id for r in again] == [run.info.run_id]


def test_the_default_store_is_a_sqlite_file_under_the_output_root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    cfg = {"experiment": {"name": "exp21"}, "tracking": {"backend": "mlflow", "tracking_uri": None,
                                                         "experiment_name": None}}
    assert tracking.where(cfg) == tracking.Where(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}", "exp21")
    cfg["tracking"].update(tracking_uri="http://localhost:5000", experiment_name="mine")
    assert tracking.where(cfg) == tracking.Where("http://localhost:5000", "mine")


@needs_mlflow
def test_a_two_job_multirun_is_one_parent_run_with_two_children(tmp_path, common, capsys):
    sweep, uri = tmp_path / "sweep", _uri(tmp_path)
    code = run_hydra_app(["-m", "seed=1,2", *common, "condition=truncated_oracle", f"tracking.tracking_uri={uri}",
                          f"hydra.sweep.dir={sweep}"])
    assert code == 0, capsys.readouterr().err
    _, runs = _runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.data.tags["kvprime.sweep_dir"] == str(sweep.resolve()) and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["seed"] for c in children) == ["1", "2"]
    assert sorted(c.info.run_name for c in children) == ["sweep/0", "sweep/1"]
    assert sorted(c.data.tags["kvprime.run_dir"] for c in children) == [str((sweep / j).resolve()) for j in "01"]


def test_without_mlflow_the_run_stops_before_any_model_loads(tmp_path, common, monkeypatch, capsys):
    from kvprime.models import loading

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    monkeypatch.setattr(loading, "load", no_model)
    monkeypatch.setattr(loading, "tokenizer_and_config", no_model)
    run_dir = tmp_path / "run"
    assert run_hydra_app([*common, f"hydra.run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a model was loaded" not in err
    assert err.count("kvprime: error:") == 1
    said = " ".join(err.split())
    assert "tracking=mlflow" in said and "pip install 'kvprime[mlflow]'" in said
    assert not run_dir.exists() or not any(run_dir.iterdir())


@needs_mlflow
def test_a_store_that_cannot_be_written_is_one_paragraph_and_the_run_stays_complete(tmp_path, common, capsys):
    (tmp_path / "not_a_folder").write_text("a file where the store's folder should be")
    uri = f"sqlite:///{tmp_path / 'not_a_folder' / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    code = run_hydra_app([*common, "condition=truncated_oracle", f"tracking.tracking_uri={uri}",
                          f"hydra.run.dir={run_dir}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err
    assert f"tracking.tracking_uri='{uri}'" in err and "is complete" in err
    assert (run_dir / "results.json").is_file()


@needs_mlflow
def test_an_untracked_run_logs_nothing_and_resumed_with_tracking_is_logged(tmp_path, data_file, monkeypatch, capsys):
    """tracking is free to change on resume (it changes no number): a run started untracked, or by a kvprime
    without tracking (no tracking section in its config.json), is logged once resumed with tracking=mlflow."""
    monkeypatch.setenv("KVPRIME_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    run_dir, uri = tmp_path / "run", _uri(tmp_path)
    args = [*TINY, "dataset=jsonl", f"dataset.path={data_file}", "condition=truncated_oracle",
            f"hydra.run.dir={run_dir}"]
    assert run_hydra_app(args) == 0, capsys.readouterr().err
    config = json.loads((run_dir / "config.json").read_text())
    assert config["tracking"]["backend"] == "none"
    assert not list(tmp_path.rglob("mlflow.db")) and "logged to" not in capsys.readouterr().err
    del config["tracking"]
    (run_dir / "config.json").write_text(json.dumps(config))
    assert run_hydra_app([*args, "resume=true", "tracking=mlflow", f"tracking.tracking_uri={uri}"]) == 0, \
        capsys.readouterr().err
    _, runs = _runs(uri)
    assert [r.data.tags["kvprime.run_dir"] for r in runs] == [str(run_dir.resolve())]
