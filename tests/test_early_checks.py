"""Checks before the model loads (issue 21, item 5): token lengths with on_too_long=error, the context and
sliding windows from the model's config, and the random control's pool in a grouped run, all refused in one
paragraph without reading any weights."""

import os

import pytest
from fixtures import cli
from fixtures.jsonl import write_jsonl

from kvprime.config.compose import compose
from kvprime.models import loading
from kvprime.pipeline import runner
from kvprime.pipeline.session import Session
from kvprime.surrogates import sources

TINY = ["model=tiny_random_llama", "stats.n_boot=1000", "progress=false"]
# Runs the CLI with the weight-loading function replaced by one that exits 99: a run that loads weights cannot
# exit 2.
NO_WEIGHTS = ("import sys\nfrom kvprime.models import loading\n"
              "def no_weights(*a, **k):\n    print('WEIGHTS LOADED', file=sys.stderr); sys.exit(99)\n"
              "loading.load = no_weights\n"
              "from kvprime.commands.cli import main; sys.argv = ['kvprime', *sys.argv[1:]]; main()")


def _rows(n=6, long=()):
    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the city of France and into the sea. "
                                       f"It is known for the tower {i}.",
             "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"} for i in range(n)]
    for i in long:
        rows[i]["passage"] = " ".join(["word"] * 200)
    return rows


def _write(path, rows):
    write_jsonl(path, rows)
    return path


def _grouped_rows(sizes):
    """Questions grouped by passage: passage p has sizes[p] questions."""
    return [{"id": f"p{p}q{q}", "passage": f"The river number {p} flows through the old city of France and into "
                                           f"the sea near the tower {p}.",
             "query": f"Question {q} about river {p}?", "answer": f"the sea {p} {q}"}
            for p, k in sizes.items() for q in range(k)]


@pytest.fixture()
def no_weights(monkeypatch):
    """loading.load raises: a test passes only if nothing asked for the weights."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(loading, "load", refuse)
    return calls


def _cli(args, tmp_path):
    env = {"KVPRIME_OUTPUT_ROOT": str(tmp_path / "outputs"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return cli.run(args, code=NO_WEIGHTS, env={**os.environ, **env}, cwd=tmp_path, timeout=600)


def _one_paragraph(stderr: str) -> str:
    """The error paragraph of a refused CLI run (its lines re-joined), checked to carry no traceback."""
    assert "Traceback" not in stderr and "WEIGHTS LOADED" not in stderr, stderr
    text = stderr[stderr.index("kvprime: error:"):]
    return " ".join(line.strip() for line in text.splitlines() if "KVPRIME_DEBUG" not in line)


# ------------------------------------------------------------ token lengths, on_too_long=error


def test_a_too_long_sample_with_on_too_long_error_is_refused_before_any_weights_load(tmp_path, no_weights):
    data = _write(tmp_path / "samples.jsonl", _rows(long=[2]))
    cfg = compose([*TINY, "dataset=jsonl", f"dataset.path={data}", "model.max_context=150", "on_too_long=error"])
    with pytest.raises(runner.RunError, match=r"sample 's2' needs \d+ tokens in condition 'bare'; the model's limit "
                                              r"is 150 \(on_too_long=error"):
        runner.run_experiment(cfg, tmp_path / "run")
    assert no_weights == [] and not (tmp_path / "run").exists()  # refused before the directory was claimed


def test_the_context_limit_comes_from_the_models_config_without_weights(tmp_path, no_weights):
    # No model.max_context: the limit is the config's max_position_embeddings, read without weights.
    data = _write(tmp_path / "samples.jsonl", _rows(long=[0]))
    cfg = compose([*TINY, "dataset=jsonl", f"dataset.path={data}", "on_too_long=error"])
    cfg["model"]["overrides"] = {"max_position_embeddings": 120}
    with pytest.raises(runner.RunError, match="the model's limit is 120"):
        runner.run_experiment(cfg, tmp_path / "run")
    assert no_weights == []


def test_sliding_windows_come_from_the_config_and_match_the_loaded_engine(tiny_tok):
    from kvprime.builders.engine import Engine
    from kvprime.cache.tiny import tiny_config, tiny_model

    config = tiny_config("gemma3_text", vocab_size=len(tiny_tok))
    light = Engine(None, tiny_tok, config=config)
    loaded = Engine(tiny_model("gemma3_text", vocab_size=len(tiny_tok)), tiny_tok)
    assert light.windows == loaded.windows == [64] and light.max_context == loaded.max_context == 2048


def test_the_early_segments_are_the_loaded_engines(tmp_path):
    # What is checked before the model loads is what scoring later measures, condition by condition.
    data = _write(tmp_path / "samples.jsonl", _rows(n=2))
    session = Session.open(compose([*TINY, "experiment=exp01", "dataset=jsonl", f"dataset.path={data}",
                                    "generation.model=null", "generation.max_new_tokens=4",
                                    f"generation.store={tmp_path / 'store'}"]))
    early = {s.sample_id: session.known_segments(s) for s in session.samples}
    assert "E1_random_prefix_trunc_corrected" in early["s0"]  # random tokens: the tokenizer alone
    assert "C2_trunc_generated_corrected" not in early["s0"]  # the tiny generator's surrogates need its weights
    for s in session.samples:
        loaded = session.segments(s)
        assert early[s.sample_id] == {n: loaded[n] for n in early[s.sample_id]}
    assert (session.checks_engine.max_context, session.checks_engine.windows) == \
        (session.engine.max_context, session.engine.windows)


def test_samples_that_fit_pass_the_early_check_and_the_run_then_loads_the_model(tmp_path):
    data = _write(tmp_path / "samples.jsonl", _rows(n=3))
    cfg = compose([*TINY, "dataset=jsonl", f"dataset.path={data}", "on_too_long=error"])
    results = runner.run_experiment(cfg, tmp_path / "run")
    assert results["counts"]["skipped_samples"] == 0 and (tmp_path / "run" / "metadata.json").exists()


@pytest.mark.integration
def test_on_too_long_error_from_the_cli_is_one_paragraph_exit_2_without_weights(tmp_path):
    data = _write(tmp_path / "samples.jsonl", _rows(long=[1]))
    run_dir = tmp_path / "run"
    out = _cli(["run", *TINY, "dataset=jsonl", f"dataset.path={data}", "model.max_context=150", "on_too_long=error",
                f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 2, out.stderr
    paragraph = _one_paragraph(out.stderr)
    assert "sample 's1' needs" in paragraph and "on_too_long=skip" in paragraph
    assert not run_dir.exists()


# ------------------------------------------------------------ generated surrogates: from the store when there


def _saved_tiny_model(tmp_path, tok):
    from kvprime.cache.tiny import tiny_model

    folder = tmp_path / "tiny-local"
    tiny_model("llama", seed=3, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _generated_cfg(tmp_path, folder, data, *extra):
    return compose(["model=hf_local", f"model.path={folder}", "model.device=cpu", "dataset=jsonl",
                    f"dataset.path={data}", "condition=exp01/C2_trunc_generated_corrected", "generation.model=null",
                    f"generation.store={tmp_path / 'store'}", "generation.max_new_tokens=4", "stats.n_boot=1000",
                    "progress=false", *extra])


def _store_long_surrogates(session, text):
    """Put ``text`` in the store as every selected sample's generated surrogate, keyed as the run will look."""
    from kvprime.surrogates.generation import GENERATION_TEMPLATES

    service = session.surrogate_service
    gen_id = service.generator_id_without_weights
    (template,) = service.templates()
    for s in session.plan.selection.samples:
        key = service.store.key(model_id=gen_id, template_name=template, template_text=GENERATION_TEMPLATES[template],
                                settings=service.generation_settings, document=s.passage)
        service.store.put(key, text, {"model_id": gen_id})


def test_a_generated_surrogate_in_the_store_is_length_checked_before_any_weights_load(tmp_path, tiny_tok,
                                                                                     monkeypatch):
    folder = _saved_tiny_model(tmp_path, tiny_tok)
    data = _write(tmp_path / "samples.jsonl", _rows(n=3))
    cfg = _generated_cfg(tmp_path, folder, data, "model.max_context=150", "on_too_long=error")
    no_weights = []
    monkeypatch.setattr(loading, "load", lambda *a, **k: no_weights.append(a) or pytest.fail("weights loaded"))
    # Not in the store: the generated condition is checked late (its text needs the generator); the others fit.
    session = Session.open(cfg, only="exp01/C2_trunc_generated_corrected")
    runner.check_lengths(session)
    assert list(session.known_segments(session.samples[0])) == ["bare"]
    # In the store: checked here, and too long, although every passage fits.
    _store_long_surrogates(session, " ".join(["query"] * 200))
    session = Session.open(cfg, only="exp01/C2_trunc_generated_corrected")
    with pytest.raises(runner.RunError, match=r"sample 's0' needs \d+ tokens in condition 'C2_trunc_generated"):
        runner.check_lengths(session)
    assert no_weights == []


def test_the_full_load_reuses_the_tokenizer_read_before_it(tmp_path, tiny_tok, monkeypatch):
    import transformers

    folder = _saved_tiny_model(tmp_path, tiny_tok)
    data = _write(tmp_path / "samples.jsonl", _rows(n=2))
    reads = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: reads.append(a) or real(*a, **k))
    session = Session.open(compose(["model=hf_local", f"model.path={folder}", "model.device=cpu", "dataset=jsonl",
                                    f"dataset.path={data}", "on_too_long=error"]))
    runner.check_lengths(session)
    early = session.tokenizer
    assert session.model is not None and session._model[1] is early and session.engine.tokenizer is early
    assert len(reads) == 1
    # The store identity the early check reads under is the one generation uses once the weights are loaded.
    service = session.surrogate_service
    assert service.generator_id_without_weights == service.generator.model_id


def test_random_tokens_need_only_the_tokenizer(tmp_path, no_weights):
    data = _write(tmp_path / "samples.jsonl", _rows(n=3))
    session = Session.open(compose([*TINY, "dataset=jsonl", f"dataset.path={data}",
                                    "condition=exp01/E1_random_prefix_trunc_corrected"]),
                           only="exp01/E1_random_prefix_trunc_corrected")
    text = session.surrogates(session.samples[0])["E1_random_prefix_trunc_corrected"]
    assert text and no_weights == []


# ------------------------------------------------------------ the random control's pool (experiment=reuse)


def _reuse(tmp_path, sizes, *extra):
    data = _write(tmp_path / "grouped.jsonl", _grouped_rows(sizes))
    return [*TINY, "experiment=reuse", "dataset=jsonl", f"dataset.path={data}", "generation.model=null", *extra]


def test_reuse_with_one_passage_says_why_and_the_n_that_works_before_any_weights_load(tmp_path, no_weights):
    cfg = compose(_reuse(tmp_path, {0: 5, 1: 2, 2: 3}, "dataset.n_samples=4"))
    with pytest.raises(runner.RunError) as err:
        runner.run_experiment(cfg, tmp_path / "run")
    text = str(err.value)
    assert "questions of other passages" in text and "selects one whole passage (5 questions" in text
    assert "Set dataset.n_samples=6 or more" in text and "\n" not in text
    assert no_weights == [] and not (tmp_path / "run").exists()
    # ... and that n does select a second passage: the check passes.
    ok = compose(_reuse(tmp_path, {0: 5, 1: 2, 2: 3}, "dataset.n_samples=6"))
    assert len(Session.open(ok).samples) == 7


def test_reuse_on_data_with_a_single_passage_says_no_n_helps(tmp_path, no_weights):
    cfg = compose(_reuse(tmp_path, {0: 4}, "dataset.n_samples=2"))
    with pytest.raises(runner.RunError, match="The data holds no second passage with at least two usable questions"):
        runner.run_experiment(cfg, tmp_path / "run")
    assert no_weights == []


def test_random_query_with_a_single_distinct_query_is_refused_before_any_weights_load(tmp_path, no_weights):
    rows = _rows(n=3)
    for r in rows:
        r["query"] = "Where does the river flow?"
    data = _write(tmp_path / "samples.jsonl", rows)
    cfg = compose([*TINY, "dataset=jsonl", f"dataset.path={data}"])
    with pytest.raises(runner.RunError, match=r"random_query \(condition truncated_random\).*have no other query"):
        runner.run_experiment(cfg, tmp_path / "run")
    assert no_weights == []


def test_random_query_unserved_counts_only_samples_without_a_control():
    from types import SimpleNamespace

    def s(sid, passage, query, fixed=None):
        return SimpleNamespace(sample_id=sid, passage=passage, query=query, random_query=fixed)

    two = [s("a", "P", "q1"), s("b", "P", "q2"), s("c", "Q", "q3"), s("d", "Q", "q4")]
    assert sources.random_query_unserved(two, by_passage=True) == []
    one = two[:2]
    assert [x.sample_id for x in sources.random_query_unserved(one, by_passage=True)] == ["a", "b"]
    assert sources.random_query_unserved(one, by_passage=False) == []  # ungrouped: the sibling is another query
    fixed = [s("a", "P", "q1", fixed="control"), s("b", "P", "q1")]
    assert [x.sample_id for x in sources.random_query_unserved(fixed, by_passage=False)] == ["b"]


@pytest.mark.integration
def test_reuse_pool_refusal_from_the_cli_is_one_paragraph_exit_2_without_weights(tmp_path):
    run_dir = tmp_path / "run"
    out = _cli(["run", *_reuse(tmp_path, {0: 5, 1: 2}, "dataset.n_samples=4"), f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 2, out.stderr
    paragraph = _one_paragraph(out.stderr)
    assert "other passages" in paragraph and "dataset.n_samples=6" in paragraph
    assert not run_dir.exists()
