"""generation.model: surrogates written by another model than the one scored, keyed, recorded and loaded lazily.

The tiny random Llama stands in for both models: the scored one is built with model.seed=1, the generator is
conf/model/tiny_random_llama.yaml (seed 0), so they are different weights with the same tokenizer.
"""

import json
import os

import pytest
from fixtures import cli
from fixtures.jsonl import FRANCE_PASSAGE

from kvprime.errors import ConfigError
from kvprime.models import loading
from kvprime.pipeline.session import Session
from kvprime.surrogates import generation
from kvprime.surrogates.generator import generator_model_cfg


@pytest.fixture()
def overrides(tmp_path, river_samples):
    path = river_samples(3, passage=FRANCE_PASSAGE)
    return ["experiment=exp21", "+condition/routing@conditions.gen_keyword_query=gen_keyword_query",
            "model=tiny_random_llama", "model.seed=1", "dataset=jsonl", f"dataset.path={path}",
            "dataset.n_samples=3", "progress=false", "generation.max_new_tokens=6",
            f"generation.store={tmp_path / 'store'}"]


def _entries(store):
    return {p.name: json.loads(p.read_text()) for p in store.rglob("*.json")}


def test_another_generator_gets_its_own_keys_and_leaves_the_scored_model_alone(overrides, tmp_path, monkeypatch):
    seen = []
    real = generation.generate

    def spy(model, tokenizer, documents, *a, **k):
        seen.append(loading._state_dict_sha256(model))
        return real(model, tokenizer, documents, *a, **k)

    monkeypatch.setattr(generation, "generate", spy)
    own = Session.from_overrides([*overrides, "generation.model=null"])
    own_texts = own.generate()
    other = Session.from_overrides([*overrides, "generation.model=tiny_random_llama"])
    other_texts = other.generate()
    assert set(own_texts) == set(other_texts) and len(own_texts) == 3

    # The scored model is the seed-1 model in both sessions; the second session generated with the seed-0 one.
    assert own.model_info["seed"] == other.model_info["seed"] == 1
    assert own.model_id == other.model_id
    own_gen, other_gen = own.surrogate_service.generator, other.surrogate_service.generator
    assert own_gen.model_id == own.model_id and other_gen.model_id != own.model_id
    assert seen[0] == own.model_info["weights_sha256"] != seen[1]
    assert not other_gen.is_scored_model and not other_gen.loaded  # released after generating

    store = tmp_path / "store"
    entries = _entries(store)
    assert len(entries) == 6  # three documents, two generators: separate keys
    by_generator = {}
    for e in entries.values():
        by_generator.setdefault(e["meta"]["model_id"], []).append(e)
        assert e["meta"]["template_name"] == "keyword_query"
        assert e["meta"]["prompt_tokens"] > 0 and 1 <= e["meta"]["generated_tokens"] <= 6 and e["meta"]["seconds"] >= 0
    assert set(by_generator) == {own.model_id, other_gen.model_id}
    assert {e["meta"]["generator"] for e in by_generator[other_gen.model_id]} == {"tiny_random_llama"}

    service, s1 = other.surrogate_service, other.sample("s1")
    cost = service.document_cost("keyword_query", s1.passage)
    assert set(cost) == {"prompt_tokens", "shared_prompt_tokens", "generated_tokens", "seconds", "generator"}
    assert cost["generator"] == other_gen.model_id and cost["prompt_tokens"] > 0
    # The template's opening was encoded once and continued (the tiny tokenizer has no chat template: the
    # instruction alone is the shared part).
    assert 8 <= cost["shared_prompt_tokens"] < cost["prompt_tokens"]
    (spec,) = [s for s in other.specs.values() if s.surrogate == "generated:keyword_query"]
    assert service.generation_cost(spec, s1) == cost
    info = service.generation_info()
    assert info["model"] == "tiny_random_llama" and info["model_id"] == other_gen.model_id
    assert info["scored_model"] is False and info["templates"] == ["keyword_query"]
    assert service.generator_config.num_hidden_layers == 2


def test_stored_surrogates_load_no_generator(overrides, monkeypatch):
    first = Session.from_overrides([*overrides, "generation.model=tiny_random_llama"]).generate()
    loads = []
    real = loading.load
    monkeypatch.setattr(loading, "load", lambda cfg: loads.append(cfg["seed"]) or real(cfg))
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("generated although stored"))
    again = Session.from_overrides([*overrides, "generation.model=tiny_random_llama"])
    assert again.generate() == first
    # The tiny generator's identity needs its weights built (a second); a packaged one's is read from its files.
    assert loads.count(1) == 0


def test_entries_without_costs_still_load(overrides, tmp_path):
    session = Session.from_overrides(overrides)
    texts = session.generate()
    for path in (tmp_path / "store").rglob("*.json"):
        entry = json.loads(path.read_text())
        for k in ("prompt_tokens", "shared_prompt_tokens", "generated_tokens", "seconds"):
            entry["meta"].pop(k)
        path.write_text(json.dumps(entry))
    again = Session.from_overrides(overrides)
    assert again.generate() == texts
    # An entry written before the shared prefix existed had its prompt prefilled whole: 0 shared tokens.
    cost = again.surrogate_service.document_cost("keyword_query", again.sample("s0").passage)
    assert cost == {"prompt_tokens": None, "shared_prompt_tokens": 0, "generated_tokens": None, "seconds": None,
                    "generator": again.model_id}


def test_generator_config_takes_the_runs_device_and_dtype():
    cfg = generator_model_cfg({"generation": {"model": "qwen25_coder_05b_instruct"},
                               "model": {"name": "x", "device": "cpu", "dtype": "bfloat16"}})
    assert cfg["name"] == "qwen25_coder_05b_instruct" and cfg["device"] == "cpu" and cfg["dtype"] == "bfloat16"
    assert generator_model_cfg({"generation": {"model": None}, "model": {"name": "x"}}) == {"name": "x"}
    with pytest.raises(ConfigError, match="model.path"):
        generator_model_cfg({"generation": {"model": "hf_local"}, "model": {}})


@pytest.mark.integration
def test_unknown_generator_is_one_paragraph_before_any_model_loads(tmp_path):
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1"}
    env.pop("KVPRIME_DEBUG", None)
    proc = cli.run(["run", "experiment=routing", "model=tiny_random_llama",
                    "dataset=exp21_sanity", "generation.model=qwen_typo", "progress=false"],
                   env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "generation.model='qwen_typo'" in err
    assert "qwen25_coder_05b_instruct" in err and "tiny_random_llama" in err and "No model was loaded" in err
    assert err.count("generation.model='qwen_typo'") == 1
    assert not (tmp_path / "out").exists()  # refused before the run directory was claimed
