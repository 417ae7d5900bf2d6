"""A researcher's own builder and condition, in a folder outside the repository, exactly as docs/extending.md shows
them: registered without any edit to kvprime, checked before the model loads, run by `kvprime run`, and the
masked entries provably receive no attention."""

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from fixtures import cli

from kvprime.builders import BUILDERS
from kvprime.builders.conditions import ConditionSpec, validate
from kvprime.builders.engine import Engine
from kvprime.cache.tiny import tiny_model, tiny_tokenizer
from kvprime.config import plugins
from kvprime.config.compose import compose
from kvprime.errors import ConfigError
from kvprime.pipeline import runner

README = Path(__file__).resolve().parent.parent / "docs" / "extending.md"  # the Extending page


def readme_examples() -> dict[str, str]:
    """The README's example files: each code block right after an `<!-- example: <path> -->` line."""
    text = README.read_text()
    found = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S)
    return dict(found)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    files = readme_examples()
    assert {"my_study/masked_prefix.py", "my_study/condition/masked_surrogate.yaml"} <= set(files)
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body)
    assert not str(root).startswith(str(README.parents[1]))
    return root / "my_study"


@pytest.fixture(scope="module")
def masked(study):
    plugins.load([str(study / "masked_prefix.py")])
    assert "masked_prefix" in BUILDERS
    return BUILDERS["masked_prefix"]


def _spec(name, **kw):
    base = dict(surrogate="query", prefix_template="{surrogate} ", prompt_template="\n\nQuestion: {query}\nAnswer:")
    return ConditionSpec(name, **{**base, **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_masked_prefix_equals_cutting_it_with_shift(masked, arch):
    """With no sink, attention over [masked prefix, document] at positions S.. equals attention over the
    document alone at positions 0.. (RoPE depends on relative positions; the document's states were computed
    after the same prefix in both). Any attention to the masked entries would change the NLL."""
    tok = tiny_tokenizer()
    eng = Engine(tiny_model(arch, vocab_size=len(tok)), tok, sink="none")
    doc, q, ans = "The river flows through the old city and into the sea.", "Where does the river flow?", "into the sea"
    m = _spec("m", builder="masked_prefix")
    s = _spec("s", builder="truncate_prefix", rope_fix="shift")
    for spec in (m, s):
        validate(spec, BUILDERS)
    seg_m = eng.segments(m, document=doc, query=q, answer=ans, surrogate=q)
    seg_s = eng.segments(s, document=doc, query=q, answer=ans, surrogate=q)
    assert seg_m.document == seg_s.document and [sp.role for sp in seg_m.spans] == ["masked", "kept"]
    pm, ps = eng.build(m, seg_m), eng.build(s, seg_s)
    assert len(pm) == len(seg_m.prefix) + len(seg_m.document) and pm.attend.count(False) == len(seg_m.prefix)
    nll_m, nll_s = eng.score(pm, seg_m).nll, eng.score(ps, seg_s).nll
    assert abs(nll_m - nll_s) <= 1e-4
    batched = eng.score_many([(pm, seg_m), (ps, seg_s)])
    assert abs(batched[0].nll - nll_m) <= 1e-5

    # The masked entries' contents do not matter at all: overwrite them and the NLL stays the same...
    n = len(seg_m.prefix)
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for layer in pm.cache.layers:
            layer.keys[:, :, :n] = torch.randn_like(layer.keys[:, :, :n]) * 10
            layer.values[:, :, :n] = torch.randn_like(layer.values[:, :, :n]) * 10
    assert abs(eng.score(pm, seg_m).nll - nll_m) <= 1e-6
    # ...while unmasking them does (the check can fail).
    unmasked = type(pm)(**{**pm.__dict__, "attend": None})
    assert abs(eng.score(unmasked, seg_m).nll - nll_m) > 1e-3


def test_builder_settings_are_checked_before_the_model_loads(masked, monkeypatch, tmp_path):
    from kvprime.models import loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", no_load)
    cfg = compose(["model=tiny_random_llama", "dataset=exp21_sanity", "condition=truncated_oracle",
                   "condition.builder=masked_prefix", "condition.rope_fix=null", "+condition.mask_sink=maybe",
                   "stats.n_boot=1000"])
    with pytest.raises(ConfigError, match="mask_sink='maybe' is not accepted"):
        runner.run_experiment(cfg, tmp_path / "r", only="truncated_oracle")
    cfg = compose(["model=tiny_random_llama", "dataset=exp21_sanity", "condition=truncated_oracle",
                   "condition.builder=masked_prefix", "stats.n_boot=1000"])
    with pytest.raises(ConfigError, match="has unknown key.*rope_fix.*settings of builder 'masked_prefix': mask_sink"):
        runner.run_experiment(cfg, tmp_path / "r2", only="truncated_oracle")


@pytest.mark.integration
def test_outside_folder_runs_through_kvprime_run(study, tmp_path):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    proc = cli.run(["run", "--config-dir", str(study),
                    "plugins=[masked_prefix]", "condition=masked_surrogate", "model=tiny_random_llama",
                    "model.sink=none", "dataset=exp21_sanity", "stats.n_boot=1000", "progress=false",
                    f"hydra.run.dir={run_dir}"],
                   env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(run_dir / "summary.csv")
    assert list(summary.condition) == ["bare", "masked_surrogate"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["conditions"]["masked_surrogate"]["builder"] == "masked_prefix"
    assert plan["conditions"]["masked_surrogate"]["mask_sink"] is False
    assert any("masked_prefix keeps" in n for n in plan["builder_notes"])
    assert "masked_prefix keeps" in (run_dir / "report.md").read_text()
    # A later `kvprime report`, without --config-dir, finds the run's plugin through the file it recorded.
    summary_bytes = (run_dir / "summary.csv").read_bytes()
    proc = cli.run(["report", str(run_dir)], env=env, cwd=tmp_path / "..", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "summary.csv").read_bytes() == summary_bytes


def test_several_passages_are_document_spans_tokenized_alone(tmp_path):
    """A sample with several passages: one document span each, its ids those of the passage tokenized alone,
    and the NLL from the full cache equals one forward pass over the concatenated ids."""
    from kvprime.cache.scoring import score_without_cache
    from kvprime.cache.segments import tokenize
    from kvprime.pipeline.session import Session

    passages = ["The old bridge crosses the river north of town.", "The river flows into the sea at the bay.",
                "Fishing boats leave the bay at dawn."]
    data = tmp_path / "multi.jsonl"
    data.write_text(json.dumps({"id": "m0", "passage": passages[1], "passages": passages,
                                "query": "Where does the river flow?", "answer": "into the sea"}) + "\n"
                    + json.dumps({"id": "m1", "passage": passages[2], "query": "When do boats leave?",
                                  "answer": "at dawn"}) + "\n")
    session = Session.from_overrides(["model=tiny_random_llama", "dataset=jsonl", f"dataset.path={data}",
                                      "stats.n_boot=1000"])
    sample = session.sample()
    assert sample.documents == passages
    seg = session.segments(sample)["bare"]
    docs = [s for s in seg.spans if s.kind == "document"]
    assert [s.name for s in docs] == ["document_0", "document_1", "document_2"]
    for span, text in zip(docs, passages, strict=True):
        assert list(span.ids) == tokenize(session.tokenizer, text)
    eng = session.engine
    primed = eng.build(session.specs["bare"], seg)
    assert primed.token_ids == list(seg.cache_ids)
    ids = list(seg.cache_ids) + list(seg.prompt) + list(seg.answer)
    assert abs(eng.score(primed, seg).nll - score_without_cache(eng.model, ids, len(seg.answer))) <= 1e-4
