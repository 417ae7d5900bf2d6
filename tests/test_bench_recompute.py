"""``kvprime bench``'s selective-recompute row: one experiment=blend condition timed one sample at a time and in the
run's batches on the same samples, with the same NLLs, the batched path in fewer model calls, no second model load
and no surrogate generation."""

import pytest

from kvprime.cache import recompute
from kvprime.commands import bench as bench_module
from kvprime.config.compose import compose
from kvprime.errors import ConfigError
from kvprime.models import loading
from kvprime.surrogates import generation

TINY = ["model=tiny_random_llama", "dataset.n_samples=2", "generation.max_new_tokens=4", "generation.model=null"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """The bench on the tiny model (2 samples), every recompute forward, model load and generation recorded."""
    tmp = tmp_path_factory.mktemp("bench")
    events = []
    patch = pytest.MonkeyPatch()
    real_recompute, real_scores = recompute.recompute_batch, recompute.deviation_scores
    real_load, real_generate = loading.load, generation.generate
    patch.setattr(recompute, "recompute_batch",
                  lambda model, jobs: events.append(("recompute", len(jobs))) or real_recompute(model, jobs))
    patch.setattr(recompute, "deviation_scores",
                  lambda model, jobs, layer: events.append(("select", len(jobs))) or real_scores(model, jobs, layer))
    patch.setattr(loading, "load", lambda *a, **k: events.append(("load", 1)) or real_load(*a, **k))
    patch.setattr(bench_module, "generate", lambda *a, **k: events.append(("generate", 1)) or real_generate(*a, **k))
    try:
        r = bench_module.bench([*TINY, f"generation.store={tmp / 'store'}"], out_dir=tmp, progress=False,
                               one_by_one=False, throughput_s=0.05)
    finally:
        patch.undo()
    return r, events, tmp


def test_the_recompute_row_agrees_and_batches(bench_run):
    r, events, tmp = bench_run
    rc = r["recompute"]
    assert rc["condition"] == "bare_dev15" and rc["rule"] == "deviation" and rc["samples"] == 2
    assert rc["documents_per_sample"] == 3 and rc["samples_per_call"] == 2
    assert rc["max_abs_nll_diff"] <= 1e-4  # test_batching's tolerance for batched vs one at a time
    assert rc["samples_with_other_rows"] == 0
    assert rc["naive_s"] > 0 and rc["batched_s"] > 0 and rc["speedup"] == pytest.approx(rc["naive_s"] / rc["batched_s"])
    # The batched path really batched: fewer model forwards, and one selection pass and one recompute forward
    # holding both samples (the naive path: one sample per forward; the untimed warm-up: the first sample alone).
    assert rc["batched_forwards"] < rc["naive_forwards"]
    recomputes = [n for kind, n in events if kind == "recompute"]
    selections = [n for kind, n in events if kind == "select"]
    assert sorted(recomputes) == [1, 1, 1, 2] and sorted(selections) == [1, 1, 1, 2]
    assert rc["recompute_tokens"] > 0 and rc["selection_token_layers"] > 0 and rc["recompute_gflop"] > 0
    assert rc["batched_recompute_s"] > 0 and rc["naive_recompute_s"] > 0
    md = (tmp / "bench.md").read_text()
    assert "| selective recompute (bare_dev15) |" in md and "tokens recomputed" in md
    assert '"recompute"' in (tmp / "bench.json").read_text()


def test_the_recompute_row_loads_no_model_and_generates_nothing(bench_run):
    _, events, _ = bench_run
    kinds = [kind for kind, _ in events]
    assert kinds.count("load") == 1  # the bench's model, reused by the recompute row
    first = kinds.index("select")
    assert "generate" in kinds[:first] and "generate" not in kinds[first:]


def test_the_recompute_row_comes_after_the_existing_rows(bench_run):
    r, _, tmp = bench_run
    lines = (tmp / "bench.md").read_text().splitlines()
    stages = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "---" not in line]
    assert stages == ["stage", "encode + score", "surrogate generation", "end to end",
                      "selective recompute (bare_dev15)"]
    assert set(r["encode_score"]) >= {"naive_s", "kvprime_s", "max_abs_nll_diff"}
    assert r["encode_score"]["max_abs_nll_diff"] <= 1e-4


@pytest.mark.parametrize(("options", "chosen"), [([], "bare_dev15"), (["--recompute", "bare_first32"], "bare_first32"),
                                                 (["--no-recompute"], None)])
def test_the_cli_options_choose_or_skip_the_row(tmp_path, monkeypatch, options, chosen):
    from typer.testing import CliRunner

    from kvprime.commands import cli

    seen = {}
    monkeypatch.setattr(bench_module, "bench", lambda args, **kw: seen.update(kw, args=args))
    monkeypatch.setattr(cli, "_new_out_dir", lambda kind: tmp_path)
    result = CliRunner().invoke(cli.app, ["bench", *options, "dataset.n_samples=2"])
    assert result.exit_code == 0, result.output
    assert seen["recompute"] == chosen and seen["args"] == ["dataset.n_samples=2"]


def test_the_throughput_measurement_time_is_an_option_checked_before_the_bench(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvprime.commands import cli

    seen = {}
    monkeypatch.setattr(bench_module, "bench", lambda args, **kw: seen.update(kw))
    monkeypatch.setattr(cli, "_new_out_dir", lambda kind: tmp_path)
    assert CliRunner().invoke(cli.app, ["bench"]).exit_code == 0 and "throughput_s" not in seen  # the bench's own
    assert CliRunner().invoke(cli.app, ["bench", "--throughput-seconds", "0.5"]).exit_code == 0
    assert seen["throughput_s"] == 0.5
    seen.clear()
    result = CliRunner().invoke(cli.app, ["bench", "--throughput-seconds", "0"])
    assert result.exit_code == 2 and "--throughput-seconds 0.0 is not accepted" in result.output and not seen


def test_the_cli_refuses_both_options(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvprime.commands import cli

    monkeypatch.setattr(bench_module, "bench", lambda args, **kw: pytest.fail("the bench ran"))
    monkeypatch.setattr(cli, "_new_out_dir", lambda kind: tmp_path)
    result = CliRunner().invoke(cli.app, ["bench", "--recompute", "bare_dev05", "--no-recompute"])
    assert result.exit_code == 2 and "contradict" in result.output and "Traceback" not in result.output


def test_the_default_condition_is_blends_bare_deviation_at_015():
    cfg = compose(["model=tiny_random_llama"], bench_module.RECOMPUTE_DEFAULTS)
    c = cfg["conditions"][bench_module.RECOMPUTE_CONDITION]
    assert (c["builder"], c["rule"], c["ratio"]) == ("independent_recompute", "deviation", 0.15)
    assert "joint" not in bench_module.recompute_conditions(cfg)
    assert len(bench_module.recompute_conditions(cfg)) == 12


@pytest.mark.slow  # composes on the packaged SQuAD data
def test_the_blend_session_takes_the_bench_overrides_but_not_its_experiment():
    blend = bench_module.recompute_session(["experiment=exp21", "conditions.bare.rope_fix=none", *TINY],
                                           "bare_first16")
    assert blend.cfg["experiment"]["name"] == "blend" and blend.cfg["model"]["name"] == "tiny_random_llama"
    assert len(blend.samples) == 2 and set(blend.specs) == {"independent", "bare_first16"}


@pytest.mark.parametrize("name", ["joint", "no_such_condition"])
def test_a_condition_that_is_not_a_recompute_one_is_refused(name):
    with pytest.raises(ConfigError, match=f"--recompute '{name}' is not a selective-recompute condition"):
        bench_module.recompute_session(TINY, name)


@pytest.mark.slow  # the packaged SQuAD data
def test_a_generated_surrogate_missing_from_the_store_is_refused_not_generated(tmp_path):
    blend = bench_module.recompute_session([*TINY, f"generation.store={tmp_path / 'empty'}"], "gen_dev15")
    with pytest.raises(ConfigError, match="does not generate them"):
        bench_module.recompute_segments(blend, "gen_dev15")
