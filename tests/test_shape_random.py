"""``model.source: shape_random``: a real architecture from its config values, random weights, for cost."""

from __future__ import annotations

import json

import pytest
from fixtures.jsonl import write_jsonl
from omegaconf import OmegaConf

from kvprime.config import confdir
from kvprime.errors import ConfigError
from kvprime.models import loading

# A copy of the 7B config shrunk to a few million parameters: every code path of the real one, built in a second.
SHRUNK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16}


def _cfg(**changes):
    cfg = OmegaConf.to_container(confdir.load("model", "mistral_7b_shape_random"), resolve=True)
    cfg.update(changes)
    return cfg


def test_the_yaml_is_mistral_7b_instruct_v02():
    """config.json of mistralai/Mistral-7B-Instruct-v0.2, read through transformers (rope_theta included),
    vocabulary aside (the borrowed tokenizer's, see the YAML)."""
    c = loading.model_config(_cfg())
    assert type(c).__name__ == "MistralConfig"
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.max_position_embeddings, c.sliding_window) == (4096, 14336, 32, 32, 8, 128, 32768, None)
    assert c.rope_parameters["rope_theta"] == 1e6 and c.rope_parameters["rope_type"] == "default"
    assert c.rms_norm_eps == 1e-5 and c.hidden_act == "silu" and not c.tie_word_embeddings
    from kvprime.analysis.cost import forward_flops

    # 2 x 7.0e9 non-embedding parameters (plus the LM head's 2 x 4096 x 49152 for the one logit) per token.
    assert forward_flops(c, 1, 0, 1) == pytest.approx(2 * (6.98e9 + 4096 * 49152), rel=0.01)


@pytest.mark.slow
def test_a_shrunk_copy_runs_an_experiment_on_the_borrowed_tokenizer(tmp_path):
    from kvprime.config.compose import compose
    from kvprime.pipeline import runner

    rows = [{"id": f"s{i}", "passage": f"The river number {i} flows through the old city and into the sea.",
             "query": f"Where does river {i} flow?", "answer": "into the sea"} for i in range(2)]
    data = tmp_path / "samples.jsonl"
    write_jsonl(data, rows)
    cfg = compose(["model=mistral_7b_shape_random", "model.device=cpu", "model.dtype=float32",
                   *(f"model.config.{k}={v}" for k, v in SHRUNK.items()), "dataset=jsonl", f"dataset.path={data}",
                   "stats.n_boot=1000", "progress=false"])
    runner.run_experiment(cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["model"]["source"] == "shape_random" and meta["model"]["tokenizer"] == "smollm2_135m_instruct"
    lines = [json.loads(x) for x in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 5 and all(x["nll"] == x["nll"] for x in lines)
    assert meta["model_shape"]["hidden_size"] == 64


@pytest.mark.slow
def test_bad_shape_random_settings_are_one_paragraph():
    with pytest.raises(ConfigError, match="model.tokenizer='nope' is not a model config"):
        loading.model_config(_cfg(tokenizer="nope"))
    with pytest.raises(ConfigError, match="no model.config mapping"):
        loading.model_config(_cfg(config={}))
    with pytest.raises(ConfigError, match="model.arch='nonsense' is not a transformers model type"):
        loading.model_config(_cfg(arch="nonsense"))
    with pytest.raises(ConfigError, match="vocab_size=32000 is smaller than the vocabulary"):
        loading.load(_cfg(device="cpu", config={**_cfg()["config"], **SHRUNK, "vocab_size": 32000}))
