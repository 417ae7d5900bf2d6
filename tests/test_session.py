"""One Session behind every command: run, inspect and walkthrough see the same samples, random-query pool,
surrogate texts and segment token ids for the same config and sample."""


import pytest
from fixtures.jsonl import write_jsonl

from kvprime.config.compose import compose, with_defaults
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner
from kvprime.surrogates import sources as surrogates

N_FILE, N_SELECTED = 6, 4  # a selection smaller than the file: the pool must be the selection's queries
SAMPLE = "s1"  # its random query differs between a pool of the 4 selected queries and one of all 6
SEGMENTS = ("sink", "prefix", "document", "suffix", "prompt", "answer")
# exp21 (truncated_random: random_query) plus one condition of each other surrogate source.
EXTRA = ["+condition/exp01@conditions.E2_full_random_prefix=E2_full_random_prefix",  # random_tokens
         "+condition/routing@conditions.static_factual=static_factual",
         "+condition/routing@conditions.gen_keyword_query=gen_keyword_query"]


@pytest.fixture()
def overrides(tmp_path):
    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city of France and into the "
                                       f"sea near the tower {i}. Boats carry grain along it.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(N_FILE)]
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, rows)
    return ["experiment=exp21", *EXTRA, "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={path}",
            f"dataset.n_samples={N_SELECTED}", "stats.n_boot=1000", "progress=false", "save_tokens=true",
            "generation.max_new_tokens=6", f"generation.store={tmp_path / 'store'}"]


@pytest.fixture()
def pools(monkeypatch):
    """Every pool a random query is drawn from, as the commands hand it over."""
    seen: list = []
    original = surrogates.random_query

    def spy(sample, pool, seed, **kw):
        seen.append(tuple(pool))
        return original(sample, pool, seed, **kw)

    monkeypatch.setattr(surrogates, "random_query", spy)
    return seen


@pytest.mark.slow
def test_run_inspect_and_walkthrough_see_the_same_sample(overrides, pools, tmp_path):
    from kvprime.commands.inspect_cache import inspect_main
    from kvprime.commands.walkthrough import walkthrough

    seen = {}

    pools.clear()
    runner.run_experiment(compose(overrides), tmp_path / "run")
    inputs = read_jsonl(tmp_path / "run" / "inputs.jsonl")
    run_ids = [r["sample_id"] for r in inputs]
    assert run_ids == [f"s{i}" for i in range(N_SELECTED)] and SAMPLE in run_ids
    selection_pool = tuple(r["query"] for r in inputs)
    names = list(next(r for r in inputs if r["sample_id"] == SAMPLE)["surrogates"])
    assert len(names) == 8
    seen["run"] = {
        "pools": set(pools),
        "surrogates": next(r for r in inputs if r["sample_id"] == SAMPLE)["surrogates"],
        "segments": {r["condition"]: {**r["segment_token_ids"], "prompt": r["prompt_token_ids"],
                                      "answer": r["answer_token_ids"]}
                     for r in read_jsonl(tmp_path / "run" / "scores.jsonl") if r["sample_id"] == SAMPLE},
    }

    pools.clear()
    walked = walkthrough([*overrides, f"sample={SAMPLE}"])
    assert walked["sample_id"] == SAMPLE
    # The drift this guards against: the walkthrough drew random queries from the whole file, not the selection.
    assert set(pools) == seen["run"]["pools"] == {selection_pool}
    seen["walkthrough"] = {"pools": set(pools),
                           "surrogates": {n: walked["caches"][n]["surrogate"] for n in names},
                           "segments": {n: walked["caches"][n]["segments"] for n in names}}

    pools.clear()
    inspected = [inspect_main([*overrides, f"sample={SAMPLE}", f"conditions=[{a},{b}]"])
                 for a, b in zip(names[::2], names[1::2], strict=False)]  # two at a time; an odd last one is left out
    assert {r["sample_id"] for r in inspected} == {SAMPLE}
    conds = {n: c for r in inspected for n, c in r["conditions"].items()}
    seen["inspect"] = {"pools": set(pools), "surrogates": {n: conds[n]["surrogate"] for n in names},
                       "segments": {n: conds[n]["segments"] for n in names}}

    for command, got in seen.items():
        assert got["pools"] == {selection_pool}, command
    for command in ("inspect", "walkthrough"):
        assert seen[command]["surrogates"] == seen["run"]["surrogates"], command
        for name in names:
            assert {k: list(seen[command]["segments"][name][k]) for k in SEGMENTS} == \
                   {k: list(seen["run"]["segments"][name][k]) for k in SEGMENTS}, (command, name)
    texts = seen["run"]["surrogates"]
    assert texts["truncated_random"] in selection_pool and texts["truncated_random"] != "Where does river 1 flow?"
    assert texts["E2_full_random_prefix"] and texts["gen_keyword_query"]


def test_session_holds_the_runs_selection_and_pool(overrides):
    from kvprime.pipeline.session import Session

    session = Session.from_overrides(overrides)
    assert [s.sample_id for s in session.samples] == [f"s{i}" for i in range(N_SELECTED)]
    assert session.pool == tuple(f"Where does river {i} flow?" for i in range(N_SELECTED))
    assert session.sample().sample_id == "s0"
    assert session.sample("s5").sample_id == "s5"  # outside the selection, still inspectable ...
    texts = session.surrogates(session.sample("s5"), ["truncated_random"])
    assert texts["truncated_random"] in session.pool  # ... but its random query comes from the selection
    first = session.segments(session.sample(SAMPLE))
    assert session.segments(session.sample(SAMPLE)) == first  # resolved once, the same every time
    assert session.model is session.model and session.engine is session.engine
    with pytest.raises(Exception, match="not among"):
        session.sample("nope")

    shard = Session.from_overrides([*overrides, "run.num_shards=2", "run.shard=1", "batch.samples=1"])
    assert [s.sample_id for s in shard.samples] == ["s1", "s3"]
    assert shard.pool == session.pool  # random queries come from the whole selection, not the shard


def test_command_defaults_give_way_to_the_users_choice():
    assert with_defaults(["experiment=routing"], ["experiment=exp21", "seed=1"]) == ["experiment=exp21", "seed=1"]
    assert with_defaults(["experiment=exp01", "dataset.n_samples=20"], ["+dataset.n_samples=5"]) == \
        ["experiment=exp01", "+dataset.n_samples=5"]
    assert with_defaults(["experiment=routing"], ["seed=1"]) == ["experiment=routing", "seed=1"]
    assert compose(with_defaults(["experiment=routing"], ["experiment=exp21"]))["experiment"]["name"] == "exp21"


def test_walkthrough_and_bench_help_name_their_overridable_defaults():
    from typer.testing import CliRunner

    from kvprime.commands.cli import app

    for command, default in (("walkthrough", "experiment=routing"), ("bench", "experiment=exp01")):
        out = CliRunner().invoke(app, [command, "--help"]).output
        assert default in out and "experiment=" in out.replace(default, ""), command
