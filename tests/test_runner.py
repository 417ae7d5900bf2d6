"""The run directory: every file, resumption after a crash, and refusals before any model loads."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from fixtures import cli
from fixtures.jsonl import write_jsonl

from kvprime.config import confdir
from kvprime.config.compose import compose
from kvprime.errors import ConfigError
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import plan, runner

EXP21 = ["bare", "full_oracle", "full_oracle_repeat", "truncated_oracle", "truncated_random"]
FILES = ["inputs.jsonl", "scores.jsonl", "scores.csv", "summary.csv", "comparisons.csv", "results.json", "report.md",
         "config.json"]


@pytest.fixture()
def samples_file(tmp_path):
    rows = [
        {"id": f"s{i}", "passage": f"The river number {i} flows through the city of France and into the sea. "
                                   f"It is known for the tower {i}.",
         "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"}
        for i in range(6)
    ]
    rows.append({"id": "empty", "passage": "A passage whose answer is missing.", "query": "What?", "answer": " "})
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, rows)
    return path


def tiny_cfg(samples_file, *extra):
    return compose(["model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}", "stats.n_boot=1000",
                    "save_tokens=true", "progress=false", *extra])


# Not every triple of shipped choices (700 compositions of 0.2 s): only the experiment and the dataset shape a config
# together (conf/config.yaml's `experiment_data: ${experiment}/${dataset}`), and neither plans conditions by model.
@pytest.mark.parametrize("group, name", [("experiment", e) for e in confdir.names("experiment")]
                         + [("model", m) for m in confdir.names("model")])
def test_every_shipped_config_composes_and_validates(group, name):
    others = [f"dataset={d}" for d in confdir.names("dataset")] if group == "experiment" else [None]
    for other in others:
        cfg = compose([f"{group}={name}", *([other] if other else []), "++dataset.path=x"])
        assert plan.plan_conditions(cfg), (name, other)


@pytest.mark.parametrize("cond", confdir.names("condition"))
def test_every_shipped_condition_composes_alone_and_plans_as_itself(cond):
    cfg = compose([f"condition={cond}"])
    assert list(plan.plan_conditions(cfg, only=cond))[-1] == cond.rsplit("/", 1)[-1]


def test_tiny_run_writes_every_file_with_consistent_contents(tmp_path, samples_file):
    out = tmp_path / "run"
    results = runner.run_experiment(tiny_cfg(samples_file), out)
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    scores = read_jsonl(out / "scores.jsonl")
    assert len(scores) == 6 * len(EXP21)
    assert len({(r["sample_id"], r["condition"]) for r in scores}) == len(scores)
    by_sample = {}
    for r in scores:
        by_sample.setdefault(r["sample_id"], {})[r["condition"]] = r
    for conds in by_sample.values():
        docs = {c: r["segment_token_ids"]["document"] for c, r in conds.items()}
        assert len({tuple(d) for d in docs.values()}) == 1  # identical document ids in every condition
        assert conds["bare"]["cache_len"] == conds["truncated_oracle"]["cache_len"] == \
            conds["truncated_random"]["cache_len"]
        assert conds["truncated_oracle"]["cache_token_ids"] == conds["bare"]["cache_token_ids"]
        assert conds["full_oracle"]["surrogate"] == conds["full_oracle"]["surrogate"]
        assert conds["truncated_random"]["surrogate"] != conds["truncated_oracle"]["surrogate"]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.condition) == EXP21
    bare = pd.DataFrame(scores).pivot(index="sample_id", columns="condition", values="nll")
    row = summary.set_index("condition").loc["truncated_oracle"]
    assert row.mean_delta == pytest.approx((bare["bare"] - bare["truncated_oracle"]).mean(), abs=1e-12)
    assert len(pd.read_csv(out / "comparisons.csv")) == 5
    # bare, query+doc (B, C, D), random+doc (E); openings several of them share are encoded apart (prefix extension)
    meta = results["metadata"]
    assert meta["model_encodes"] - meta["shared_openings_encoded"] == 6 * 3
    assert len(results["diagnosis"]) == 3
    assert results["rejected"] == [{"source_id": "empty", "reason": "empty answer"}]
    report = (out / "report.md").read_text()
    assert "## Diagnosis" in report and "d_z" in report and "truncated_random" in report


def test_crash_then_resume_equals_uninterrupted_run(tmp_path, samples_file, monkeypatch):
    full = tmp_path / "full"
    runner.run_experiment(tiny_cfg(samples_file), full)

    crashed = tmp_path / "crashed"
    from kvprime.builders.engine import Engine

    real_score, calls = Engine.score_many, {"n": 0}

    def dying_score(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt  # the run is killed while scoring its second chunk of samples
        return real_score(self, *a, **k)

    monkeypatch.setattr(Engine, "score_many", dying_score)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(tiny_cfg(samples_file, "batch.samples=2"), crashed)
    monkeypatch.setattr(Engine, "score_many", real_score)
    assert not (crashed / "results.json").exists()
    with open(crashed / "scores.jsonl", "a") as fh:
        fh.write('{"sample_id": "s2", "condition": "trunc')  # killed mid-write too
    assert len(read_jsonl_lenient(crashed / "scores.jsonl")) == 2 * 5

    with pytest.raises(runner.RunError, match="resume=true"):
        runner.run_experiment(tiny_cfg(samples_file, "batch.samples=2"), crashed)
    results = runner.run_experiment(tiny_cfg(samples_file, "batch.samples=2", "resume=true"), crashed)
    assert results["counts"]["log_lines_repaired_on_resume"] == 1
    a = pd.read_csv(full / "scores.csv").sort_values(["sample_id", "condition"]).reset_index(drop=True)
    b = pd.read_csv(crashed / "scores.csv").sort_values(["sample_id", "condition"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert (full / "summary.csv").read_text() == (crashed / "summary.csv").read_text()


def read_jsonl_lenient(path):
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_resume_with_other_settings_is_refused(tmp_path, samples_file):
    out = tmp_path / "run"
    runner.run_experiment(tiny_cfg(samples_file), out)
    with pytest.raises(runner.RunError, match="seed"):
        runner.run_experiment(tiny_cfg(samples_file, "resume=true", "seed=7"), out)


def test_auto_batch_settings_are_recorded_as_the_devices_numbers(tmp_path, samples_file):
    from kvprime.cache import batching
    from kvprime.config import devices

    out = tmp_path / "run"
    runner.run_experiment(tiny_cfg(samples_file), out)
    stored = json.loads((out / "config.json").read_text())
    kind = batching.device_kind(devices.resolve_device(stored["model"]))
    want = batching.DEFAULTS[kind]
    assert stored["batch"] == {"samples": want["samples"], "encode_tokens": want["encode_tokens"],
                               "score_tokens": want["score_tokens"], "extend_prefixes": False}
    assert stored["generation"]["batch_size"] == want["generation"]
    # Another generation batch size changes no surrogate, so resuming with one is allowed.
    runner.run_experiment(tiny_cfg(samples_file, "resume=true", "generation.batch_size=3"), out)


def test_batch_settings_resolve_per_device_and_refuse_bad_values():
    from kvprime.cache import batching

    cfg = compose(["batch.samples=5"])
    cuda = batching.resolve(cfg, device="cuda:0")
    assert cuda["batch"]["samples"] == 5  # an explicit number is kept
    assert cuda["batch"]["encode_tokens"] == batching.DEFAULTS["cuda"]["encode_tokens"]
    assert cuda["generation"]["batch_size"] == batching.DEFAULTS["cuda"]["generation"]
    assert batching.resolve(cfg, device="cpu")["batch"]["score_tokens"] == batching.DEFAULTS["cpu"]["score_tokens"]
    for bad in ("batch.samples=0", "batch.encode_tokens=lots", "generation.batch_size=-2", "batch.score_tokens=1.5"):
        with pytest.raises(batching.BatchSettingError, match=bad.split("=")[0].replace(".", r"\.")):
            batching.resolve(compose([bad]), device="cpu")


def test_too_long_samples_are_skipped_and_counted(tmp_path, samples_file):
    cfg = tiny_cfg(samples_file, "model.max_context=150")
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    rows[0]["passage"] = " ".join(["word"] * 200)
    write_jsonl(samples_file, rows)
    results = runner.run_experiment(cfg, tmp_path / "r")
    assert results["counts"]["skipped_samples"] == 1 and results["skipped"][0]["sample_id"] == "s0"
    assert "limit is 150" in results["skipped"][0]["reason"]
    assert "## Skipped samples" in (tmp_path / "r" / "report.md").read_text()
    cfg["on_too_long"] = "error"
    with pytest.raises(runner.RunError, match="s0"):
        runner.run_experiment(cfg, tmp_path / "r2")


def test_nonfinite_scores_are_flagged_not_averaged(tmp_path, samples_file, monkeypatch):
    from kvprime.builders.engine import Engine

    real = Engine.score_many

    def poisoned(self, items, **k):
        scores = real(self, items, **k)
        for (_primed, seg), s in zip(items, scores, strict=True):
            if len(seg.prefix) and seg.texts["document"].startswith("The river number 1 "):
                s.nll = float("nan")
        return scores

    monkeypatch.setattr(Engine, "score_many", poisoned)
    results = runner.run_experiment(tiny_cfg(samples_file), tmp_path / "r")
    summary = pd.read_csv(tmp_path / "r" / "summary.csv").set_index("condition")
    assert summary.loc["truncated_oracle", "n_nonfinite"] == 1 and summary.loc["truncated_oracle", "n"] == 5
    assert summary.loc["bare", "n_nonfinite"] == 0
    assert results["counts"]["nonfinite_scores"] == 4
    assert "non-finite" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("conditions.truncated_oracle.prompt_template='Q: {question}'", "may only use"),
    ("conditions.truncated_oracle.surrogate=none", "surrogate is 'none'"),
    ("conditions.truncated_oracle.surrogate=static:nonsense", "unknown static surrogate"),
    ("conditions.truncated_oracle.rope_fix=sideways", "rope_fix"),
    ("conditions.bare.builder=magic", "Registered builders"),
    ("+conditions.bare.colour=red", "unknown key"),
])
def test_bad_condition_settings_fail_before_loading(samples_file, override, message, tmp_path):
    cfg = tiny_cfg(samples_file, override)
    with pytest.raises(ValueError, match=message):
        runner.run_experiment(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "scores.jsonl").exists()


def test_gpu_model_on_cpu_machine_stops_with_the_reason(tmp_path, samples_file):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tiny_cfg(samples_file, "model=mistral_7b_instruct_v02")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        runner.run_experiment(cfg, tmp_path / "r")


def run_cli(*args, **kw):
    return cli.run(args, timeout=300, **kw)


@pytest.mark.integration
def test_cli_run_writes_hydra_dir_and_one_condition(tmp_path, samples_file):
    out = tmp_path / "cli"
    proc = run_cli("run", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}",
                   "condition=truncated_oracle", "stats.n_boot=1000", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert (out / ".hydra" / "config.yaml").exists() and (out / "report.md").exists()
    assert sorted(pd.read_csv(out / "summary.csv").condition) == ["bare", "truncated_oracle"]
    assert "truncated_oracle" in proc.stdout


@pytest.mark.integration
def test_cli_unknown_names_list_the_valid_ones(tmp_path):
    proc = run_cli("run", "model=gpt5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "smollm2_135m_instruct" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("run", "condition=truncated_oracel", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "truncated_oracle" in proc.stderr


@pytest.mark.integration
def test_cli_user_error_is_one_paragraph(tmp_path, samples_file):
    proc = run_cli("run", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}",
                   "conditions.truncated_oracle.surrogate=static:nonsense", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert "kvprime: error: condition 'truncated_oracle'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_help_does_not_import_torch_and_conditions_lists_all():
    code = "import sys, kvprime.commands.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    proc = run_cli("--help")
    assert proc.returncode == 0 and "run" in proc.stdout and "inspect" in proc.stdout
    listing = run_cli("conditions").stdout
    for name in EXP21 + ["truncate_prefix", "truncate_suffix", "full"]:
        assert name in listing


def test_inspect_shows_segments_and_layer_similarity(samples_file, capsys):
    from kvprime.commands.inspect_cache import inspect_main

    res = inspect_main(["model=tiny_random_llama", "dataset=jsonl", f"dataset.path={samples_file}", "sample=s3",
                        "conditions=[bare,truncated_oracle]"])
    assert res["sample_id"] == "s3" and res["same_document_ids"]
    assert len(res["layers"]) == 2
    assert res["layers"][0]["keys_cos"] == pytest.approx(1.0, abs=1e-6)  # layer 0 keys see no context
    out = capsys.readouterr().out
    assert "[OK] equal" in out and "values cos" in out


def test_python_api_from_a_notebook():
    from kvprime import Engine

    eng = Engine.load("tiny_random_llama")
    primed, seg = eng.prime("The capital of France is Paris.", surrogate="What is the capital of France?")
    bare, _ = eng.prime("The capital of France is Paris.")
    assert primed.token_ids == bare.token_ids
    score = eng.nll(primed, query="What is the capital of France?", answer="Paris", per_token=True)
    assert score.n_answer_tokens == len(score.token_logprobs) > 0 and score.finite


def test_condition_selection_keeps_either_override(samples_file):
    base = ["condition=truncated_oracle"]
    specs = plan.plan_conditions(tiny_cfg(samples_file, *base, "conditions.truncated_oracle.rope_fix=shift"),
                                 only="truncated_oracle")
    assert specs["truncated_oracle"].rope_fix == "shift"
    specs = plan.plan_conditions(tiny_cfg(samples_file, *base, "condition.rope_fix=none"), only="truncated_oracle")
    assert specs["truncated_oracle"].rope_fix == "none"
    with pytest.raises(runner.RunError, match="both"):
        plan.plan_conditions(tiny_cfg(samples_file, *base, "condition.rope_fix=none",
                                        "conditions.truncated_oracle.rope_fix=shift"), only="truncated_oracle")


def test_routing_by_similarity_without_similarities_fails_before_scoring(samples_file, tmp_path):
    cfg = tiny_cfg(samples_file, "experiment=routing", "experiment.similarity=false", "generation.model=null")
    with pytest.raises(runner.RunError, match="similarity"):
        runner.run_experiment(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "scores.jsonl").exists()


@pytest.mark.parametrize("override, message", [("on_too_long=ignore", "on_too_long"),
                                               ("generation.clean=smart", "generation.clean"),
                                               ("model.sink=eos", "model.sink")])
def test_bad_run_settings_fail_before_the_model_loads(samples_file, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        runner.run_experiment(tiny_cfg(samples_file, override), tmp_path / "r")


def test_the_terminal_summary_counts_skipped_and_rejected_samples_by_reason(tmp_path, samples_file, caplog):
    from kvprime.commands.app import _print_summary

    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    rows[0]["passage"] = " ".join(["word"] * 200)
    rows[1]["passage"] = " ".join(["word"] * 180)  # another token count, the same reason
    write_jsonl(samples_file, rows)
    results = runner.run_experiment(tiny_cfg(samples_file, "model.max_context=150"), tmp_path / "r")
    with caplog.at_level("INFO", logger="kvprime.summary"):
        _print_summary(results)
    lines = caplog.text.splitlines()
    assert "2 samples skipped as too long (each listed in report.md):" in lines
    assert "  2 × needs N tokens in condition 'bare'; the model's limit is 150" in lines
    rejected = results["rejected"][0]["reason"]
    assert "1 record rejected at load (each listed in results.json):" in lines and f"  1 × {rejected}" in lines
