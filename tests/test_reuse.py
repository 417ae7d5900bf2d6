"""One cache, many questions (issue #12, part 2): questions grouped by passage, each passage's caches built once
and scored for all its questions; the sibling_query source; the per-passage statistics."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from fixtures.jsonl import write_jsonl

from kvprime.analysis.passages import cluster_ci
from kvprime.analysis.stats import _bootstrap_ci
from kvprime.config import settings
from kvprime.config.compose import compose
from kvprime.data import load_samples
from kvprime.data.passages import passage_id
from kvprime.errors import ConfigError
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner
from kvprime.pipeline.sharding import shard
from kvprime.surrogates import sources
from kvprime.surrogates.sources.sibling_query import siblings

# Passage index -> number of questions. Rows are interleaved in the file: grouping must make them consecutive.
SIZES = {0: 3, 1: 2, 2: 4, 3: 2}


def _passage(p: int) -> str:
    return f"The river number {p} flows through the old city of France and into the sea near the tower {p}."


def _rows(sizes=SIZES):
    rows = [{"id": f"p{p}q{q}", "passage": _passage(p), "query": f"Question {q} about river {p}?",
             "answer": f"the sea {p} {q}"} for p, k in sizes.items() for q in range(k)]
    return sorted(rows, key=lambda r: (int(r["id"].split("q")[1]), r["id"]))  # p0q0, p1q0, ..., p0q1, ...


def _write(tmp_path, rows, name="samples.jsonl"):
    path = tmp_path / name
    write_jsonl(path, rows)
    return path


def _cfg(path, **extra):
    return {"name": "jsonl", "path": str(path), "n_samples": None, "selection": "first", "seed": 0, **extra}


# ------------------------------------------------------------ selection, chunks, shards


def test_grouped_selection_takes_whole_passages_consecutively_and_rejects_lone_questions(tmp_path):
    rows = _rows({**SIZES, 4: 1})  # passage 4 has a single question
    path = _write(tmp_path, rows)
    plain = load_samples(_cfg(path))
    assert [s.sample_id for s in plain.samples] == [r["id"] for r in rows]  # off: the file's order, unchanged

    got = load_samples(_cfg(path, group_by_passage=True))
    ids = [s.sample_id for s in got.samples]
    # Passages in order of first appearance, each passage's questions together, in file order.
    assert ids == [f"p{p}q{q}" for p in range(4) for q in range(SIZES[p])]
    assert [r["source_id"] for r in got.rejected] == ["p4q0"] and "group_by_passage" in got.rejected[0]["reason"]

    # n_samples counts questions, in whole passages: the passage that reaches n is taken whole.
    assert [s.sample_id for s in load_samples(_cfg(path, group_by_passage=True, n_samples=4)).samples] == \
        ["p0q0", "p0q1", "p0q2", "p1q0", "p1q1"]
    a = load_samples(_cfg(path, group_by_passage=True, n_samples=5, selection="random", seed=3)).samples
    b = load_samples(_cfg(path, group_by_passage=True, n_samples=5, selection="random", seed=3)).samples
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    by_passage = pd.Series([passage_id(s) for s in a]).value_counts()
    assert all(by_passage[p] == SIZES[int(s.sample_id[1])] for p, s in zip([passage_id(s) for s in a], a, strict=True))


def test_group_by_passage_setting_is_checked(tmp_path):
    path = _write(tmp_path, _rows())
    with pytest.raises(ConfigError, match=r"dataset.group_by_passage='yes' is not accepted.*Accepted: true \| false"):
        load_samples(_cfg(path, group_by_passage="yes"))


def test_group_by_passage_with_several_passages_a_sample_is_refused_in_one_paragraph(tmp_path):
    # Each question would get its own distractors, so no passage cache could serve its siblings.
    path = _write(tmp_path, _rows())
    multidoc = {**settings.defaults()["multidoc"], "k": 3}
    with pytest.raises(ConfigError, match=r"group_by_passage=true.*multidoc.k=3.*no cache would be shared"):
        load_samples(_cfg(path, group_by_passage=True), multidoc=multidoc)
    assert len(load_samples(_cfg(path, group_by_passage=True), multidoc={**multidoc, "k": 1}).samples) == 11


def test_shards_keep_a_passage_together_and_cover_the_selection(tmp_path):
    samples = load_samples(_cfg(_write(tmp_path, _rows()), group_by_passage=True)).samples
    parts = [shard(samples, {"num_shards": 3, "shard": i}, chunk=2, grouped=True) for i in range(3)]
    assert sorted(s.sample_id for p in parts for s in p) == sorted(s.sample_id for s in samples)
    owner = {}
    for i, part in enumerate(parts):
        for s in part:
            assert owner.setdefault(passage_id(s), i) == i  # never split over two shards
    assert len(parts[0]) == SIZES[0] + SIZES[3]  # passages 0 and 3 (round-robin, one passage a chunk)


# ------------------------------------------------------------ sibling_query


def _samples(sizes):
    return [SimpleNamespace(sample_id=f"p{p}q{q}", passage=_passage(p), query=f"Q{q} of {p}")
            for p, k in sizes.items() for q in range(k)]


def test_sibling_is_another_question_of_the_same_passage_with_one_primer_per_passage():
    samples = _samples({0: 5, 1: 2, 2: 3})
    for seed in range(10):
        sib = siblings(samples, seed)
        assert sorted(sib) == sorted(s.sample_id for s in samples)
        for sid, other in sib.items():
            assert other != sid and other.split("q")[0] == sid.split("q")[0]
        for p, k in {0: 5, 1: 2, 2: 3}.items():
            mine = {sid: o for sid, o in sib.items() if sid.startswith(f"p{p}q")}
            primer = max(set(mine.values()), key=list(mine.values()).count)
            # Every question but the primer is primed with the primer; the primer with another question.
            assert sum(o == primer for o in mine.values()) == k - 1 and mine[primer] != primer
    assert siblings(list(reversed(samples)), 4) == siblings(samples, 4)  # order of the data does not matter
    assert any(siblings(samples, s) != siblings(samples, 0) for s in range(1, 5))  # the seed does
    # A passage's choice does not depend on which other passages are selected (nor on the shard).
    alone = siblings([s for s in samples if s.sample_id.startswith("p0")], 4)
    assert alone == {k: v for k, v in siblings(samples, 4).items() if k.startswith("p0")}


def test_a_sibling_worded_as_the_question_itself_is_passed_over():
    samples = _samples({0: 3})
    samples[1].query = samples[0].query  # two questions worded alike: either would be the other's oracle
    for seed in range(10):
        sib = siblings(samples, seed)
        by_id = {s.sample_id: s.query for s in samples}
        assert all(by_id[o] != by_id[sid] for sid, o in sib.items())


def test_sibling_query_resolves_through_the_registry_and_refuses_a_lone_question():
    samples = _samples({0: 3, 1: 2})
    sib = siblings(samples, 42)
    text = sources.resolve("sibling_query", samples[0], pool=[], seed=42, selection=samples)
    assert text == next(s.query for s in samples if s.sample_id == sib[samples[0].sample_id])
    with pytest.raises(ConfigError, match=r"sibling_query.*1 of the 6.*dataset.group_by_passage=true"):
        sources.prepare("sibling_query", samples + _samples({7: 1}), 42)


def test_registry_lists_every_source_and_a_plugin_registers_its_own():
    assert sources.SOURCES == ("none", "query", "random_query", "random_tokens", "static:<name>",
                               "generated:<template>", "generated_other:<template>", "sibling_query")
    with pytest.raises(ConfigError, match="not known. Accepted: none, query, .*sibling_query"):
        sources.validate_source("sibling", sources.STATIC_SURROGATES)
    with pytest.raises(ConfigError, match="not known"):
        sources.validate_source("query:x", sources.STATIC_SURROGATES)  # query takes no argument

    @sources.register_source("shouted", arg="<n>", accepted=lambda static: {"1", "2"})
    def shouted(sample, ctx, arg):
        return sample.query.upper() + "!" * int(arg)

    try:
        s = SimpleNamespace(sample_id="a", query="why", passage="p")
        assert sources.resolve("shouted:2", s, pool=[], seed=0) == "WHY!!"
        with pytest.raises(ConfigError, match="unknown name '3'"):
            sources.validate_source("shouted:3", sources.STATIC_SURROGATES)
        assert "shouted:<n>" in sources.spellings()
    finally:
        sources.SOURCE_REGISTRY.unregister("shouted")


# ------------------------------------------------------------ the cluster bootstrap


def test_cluster_bootstrap_with_one_question_per_passage_is_the_per_question_bootstrap():
    d = np.random.default_rng(0).normal(0.1, 1.0, 40)
    got = cluster_ci(d, np.arange(40), n_boot=1000, seed=7, confidence=0.95)
    lo, hi, method = _bootstrap_ci(d, 1000, 7, 0.95)  # summary.csv's CI with the same seed
    assert (got["ci_low"], got["ci_high"], got["ci_method"]) == (lo, hi, method)
    assert got["mean_delta"] == pytest.approx(d.mean(), abs=1e-12)
    assert 0.8 < got["design_effect"] < 1.2


def test_cluster_bootstrap_widens_when_a_passage_questions_move_together():
    per_passage = np.random.default_rng(1).normal(0.0, 1.0, 30)
    d, c = np.repeat(per_passage, 4), np.repeat(np.arange(30), 4)  # four identical deltas a passage
    got = cluster_ci(d, c, n_boot=2000, seed=3, confidence=0.95)
    lo, hi, _ = _bootstrap_ci(d, 2000, 3, 0.95)
    assert 3.0 < got["design_effect"] < 5.0  # ~ the cluster size
    assert (got["ci_high"] - got["ci_low"]) > 1.6 * (hi - lo)  # ~ sqrt(4) wider than the independent CI


# ------------------------------------------------------------ whole runs on the tiny model


def _run(tmp_path, data, name, *extra, only=None):
    cfg = compose(["experiment=reuse", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data}",
                   "dataset.n_samples=null", "stats.n_boot=1000", "progress=false", "generation.model=null",
                   "generation.max_new_tokens=6", f"generation.store={tmp_path / 'store'}", *extra])
    out = tmp_path / name
    runner.run_experiment(cfg, out, only=only)
    return out


def _nll(run_dir):
    return {(r["sample_id"], r["condition"]): r["nll"] for r in read_jsonl(run_dir / "scores.jsonl")}


def test_each_passage_cache_is_built_once_and_scores_equal_separate_builds(tmp_path):
    data = _write(tmp_path, _rows())
    n, p = sum(SIZES.values()), len(SIZES)
    only = "reuse/truncated_sibling"
    grouped = _run(tmp_path, data, "grouped", f"condition={only}", only=only)
    # Separate builds: the same samples one at a time, nothing shared between questions.
    alone = _run(tmp_path, data, "alone", f"condition={only}", "dataset.group_by_passage=false", "batch.samples=1",
                 "experiment.analyses=null", only=only)
    # Per passage: one bare cache and two sibling caches (the primer's and everyone else's), whatever its size.
    assert json.loads((grouped / "metadata.json").read_text())["model_encodes"] == 3 * p
    assert json.loads((alone / "metadata.json").read_text())["model_encodes"] == 2 * n
    a, b = _nll(grouped), _nll(alone)
    assert a.keys() == b.keys() and len(a) == 2 * n
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-4
    rows = read_jsonl(grouped / "scores.jsonl")
    assert {r["sample_id"]: r["passage_id"] for r in rows} == {r["id"]: passage_id(SimpleNamespace(
        passage=r["passage"])) for r in _rows()}
    sib = {r["sample_id"]: r["surrogates"]["truncated_sibling"] for r in read_jsonl(grouped / "inputs.jsonl")}
    queries = (r["query"] for r in read_jsonl(grouped / "inputs.jsonl"))
    assert all(t != q for t, q in zip(sib.values(), queries, strict=True))


def test_reuse_experiment_reports_per_question_and_per_passage_statistics(tmp_path):
    data = _write(tmp_path, _rows())
    out = _run(tmp_path, data, "run")
    summary = pd.read_csv(out / "summary.csv")
    per = pd.read_csv(out / "analyses" / "per_passage.csv")
    comps = pd.read_csv(out / "comparisons.csv")
    # One row per test: every condition vs the baseline and every named comparison, over all passages.
    assert list(per["test"]) == [f"{c} vs bare" for c in summary["condition"] if c != "bare"] + list(comps["name"])
    assert set(per["n_passages"]) == {len(SIZES)} and set(per["n_questions"]) == {sum(SIZES.values())}
    # The question-level mean is the summary's; the passages' view is its own.
    others = [c for c in summary["condition"] if c != "bare"]
    vs = per.iloc[:len(others)]
    assert list(vs["treatment"]) == others and set(vs["reference"]) == {"bare"}
    assert np.allclose(vs["mean_delta"].to_numpy(),
                       summary.set_index("condition").loc[others, "mean_delta"].to_numpy(), rtol=0, atol=1e-12)
    assert np.allclose(per.iloc[len(others):]["mean_delta"].to_numpy(), comps["mean_delta"].to_numpy(), rtol=0,
                       atol=1e-12)
    assert ((per["passages_better"] + per["passages_tied"] + per["passages_worse"]) == len(SIZES)).all()
    # A named comparison that repeats a vs-baseline test gets the same bootstrap (seeded by the pair).
    same = per[(per.treatment == "truncated_sibling") & (per.reference == "bare")]
    assert len(same) == 2 and same.drop(columns="test").nunique().max() == 1
    report = (out / "report.md").read_text()
    assert "Per passage: cluster bootstrap over passages" in report
    assert "passage_id" in pd.read_csv(out / "scores.csv").columns
    # The random control is never a question of the sample's own passage (that would be the sibling condition).
    inputs = read_jsonl(out / "inputs.jsonl")
    siblings = {r["sample_id"]: {o["query"] for o in inputs if o["passage"] == r["passage"]} for r in inputs}
    assert all(r["surrogates"]["truncated_random"] not in siblings[r["sample_id"]] for r in inputs)
    # ... which the whole-selection draw alone would give here: the check above can fail.
    pool, samples = [r["query"] for r in inputs], [SimpleNamespace(**{**r, "random_query": None}) for r in inputs]
    assert any(sources.random_query(x, pool, 42) in siblings[x.sample_id] for x in samples)


def test_sibling_and_per_passage_refuse_an_ungrouped_selection_before_the_model_loads(tmp_path):
    rows = _rows({0: 2, 1: 1})
    data = _write(tmp_path, rows)
    with pytest.raises(ConfigError, match="sibling_query.*dataset.group_by_passage=true"):
        _run(tmp_path, data, "a", "dataset.group_by_passage=false", "experiment.analyses=null")
    with pytest.raises(ConfigError, match="per_passage.*dataset.group_by_passage=false"):
        _run(tmp_path, data, "b", "dataset.group_by_passage=false")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_grouped_shards_merge_into_the_unsharded_run_byte_for_byte(tmp_path):
    from kvprime.scaleout.merge import merge_runs

    data = _write(tmp_path, _rows())
    only, base = "reuse/truncated_sibling", ["condition=reuse/truncated_sibling", "run.num_shards=3"]
    whole = _run(tmp_path, data, "whole", base[0], only=only)
    shards = [_run(tmp_path, data, f"shard{i}", *base, f"run.shard={i}", only=only) for i in range(3)]
    merge_runs(shards, tmp_path / "merged")
    for name in ("scores.csv", "summary.csv", "comparisons.csv", "analyses/per_passage.csv"):
        assert (tmp_path / "merged" / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_grouped_run_killed_after_its_first_passage_resumes_to_the_uninterrupted_tables(tmp_path, monkeypatch):
    from kvprime.builders.engine import Engine

    data = _write(tmp_path, _rows())
    only, extra = "reuse/truncated_sibling", "condition=reuse/truncated_sibling"
    full = _run(tmp_path, data, "full", extra, only=only)
    real, calls = Engine.score_many, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt  # killed while scoring the second passage
        return real(self, *a, **k)

    monkeypatch.setattr(Engine, "score_many", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, data, "crashed", extra, only=only)
    monkeypatch.setattr(Engine, "score_many", real)
    assert len(read_jsonl(tmp_path / "crashed" / "scores.jsonl")) == 2 * SIZES[0]  # the first passage, whole
    _run(tmp_path, data, "crashed", extra, "resume=true", only=only)
    for name in ("scores.csv", "summary.csv", "analyses/per_passage.csv"):
        assert (tmp_path / "crashed" / name).read_bytes() == (full / name).read_bytes(), name
