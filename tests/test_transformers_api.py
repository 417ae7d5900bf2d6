"""kvprime's calls into transformers use the API of the installed version, and models load from a folder.

1. No kvprime call raises a transformers deprecation: transformers 5.24 renamed the forward keyword
   ``past_key_values`` to ``cache`` (and the output field with it; the old names warn and go in 5.40).
   Every path that reaches the model runs here on tiny random models of several architectures (Gemma3 with
   its sliding-window layers among them) while warnings and transformers' log are recorded.
2. ``model=hf_local`` / ``model=hf_hub``: the shipped configs load a saved folder and refuse a missing
   ``model.path`` / ``model.id`` before any weights load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings

import pytest
import torch

from kvprime.builders.conditions import ConditionSpec
from kvprime.builders.engine import Engine
from kvprime.cache import hf_internals as hf
from kvprime.cache.scoring import score_without_cache
from kvprime.cache.tiny import tiny_model, tiny_tokenizer
from kvprime.commands.bench import NaiveEngine, naive_score
from kvprime.config import confdir
from kvprime.errors import ConfigError
from kvprime.models import loading
from kvprime.surrogates.generation import GenerationSettings, generate

DOCS = ["The capital of France is Paris. It is known for the Eiffel Tower.",
        "Normans were the people who gave their name to Normandy, a region in France.",
        "What is the population of Japan?"]
QUERIES = ["What is the capital of France?", "Who were the Normans?", "How many people live in Japan?"]
ANSWERS = ["Paris", "a people", "many"]
SHORT_TEMPLATE = "Question about:"  # keeps generation prompts inside the tiny Gemma3's 64-token window

# arch name in kvprime.cache.tiny -> config overrides; gemma3_text has sliding-window layers (window 64)
ARCHS = {"llama": {}, "qwen2": {}, "mistral": {}, "gemma3_text": {},
         "phi": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}}

SPECS = [ConditionSpec("full", builder="full"),
         ConditionSpec("rerotate", builder="truncate_prefix", rope_fix="rerotate", prefix_template="{surrogate}\n",
                       surrogate="query"),
         ConditionSpec("shift", builder="truncate_prefix", rope_fix="shift", prefix_template="{surrogate}\n",
                       surrogate="query"),
         ConditionSpec("none", builder="truncate_prefix", rope_fix="none", prefix_template="{surrogate}\n",
                       surrogate="query"),
         ConditionSpec("suffix", builder="truncate_suffix", suffix_template="\n{surrogate}", surrogate="query"),
         ConditionSpec("offset", builder="full", position_offset=5)]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def no_transformers_deprecations():
    """Fail if the block raises a FutureWarning/DeprecationWarning or transformers logs a deprecation.

    transformers warns about a renamed keyword with ``warnings.warn(..., FutureWarning)`` and about a renamed
    output field with ``logger.warning_once``; the once-cache is cleared so an earlier test cannot hide it."""
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    bad = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
           if issubclass(w.category, (FutureWarning, DeprecationWarning, PendingDeprecationWarning))]
    bad += [f"transformers log: {r.getMessage()}" for r in handler.records if "deprecat" in r.getMessage().lower()]
    assert not bad, "kvprime's calls raised deprecations:\n" + "\n".join(sorted(set(bad)))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_engine_paths_raise_no_deprecation(arch, tok):
    eng = Engine(tiny_model(arch, seed=3, vocab_size=len(tok), **ARCHS[arch]), tok)
    with no_transformers_deprecations():
        # Engine.prime with every builder and rope_fix, then Engine.nll (one-at-a-time scoring)
        for builder, rope_fix, surrogate in [("full", None, None), ("full", None, QUERIES[0]),
                                             ("truncate_prefix", "rerotate", QUERIES[0]),
                                             ("truncate_prefix", "shift", QUERIES[0]),
                                             ("truncate_prefix", "none", QUERIES[0]),
                                             ("truncate_suffix", None, QUERIES[0])]:
            primed, _ = eng.prime(DOCS[0], surrogate=surrogate, builder=builder, rope_fix=rope_fix)
            assert eng.nll(primed, query=QUERIES[0], answer=ANSWERS[0]).finite
        eng.forget()
        # the batched path: planned encodes run as padded batches, scores as stacked caches
        work = []
        for doc, q, a in zip(DOCS, QUERIES, ANSWERS, strict=True):
            for spec in SPECS:
                work.append((spec, eng.segments(spec, document=doc, query=q, answer=a, surrogate=q)))
        n_before = eng.n_encodes
        done = eng.run_chunk(work, encode_tokens=10_000, score_tokens=10_000)
        assert len(done) == len(work) and all(score.finite for _, score in done)
        assert eng.n_encodes - n_before < len(work)  # encodes were shared and batched
        # the reference scorer without a cache
        seg = work[0][1]
        ids = list(seg.sink + seg.document + seg.prompt + seg.answer)
        assert score_without_cache(eng.model, ids, len(seg.answer)) > 0
        # the benchmark's naive path (every encode through the whole model, separate query/answer passes)
        naive = NaiveEngine(eng.model, tok)
        spec, seg = work[1]
        assert naive_score(eng.model, naive.build(spec, seg), seg) > 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generation_raises_no_deprecation(arch, tok):
    model = tiny_model(arch, seed=3, vocab_size=len(tok), **ARCHS[arch])
    settings = GenerationSettings(temperature=0.0, max_new_tokens=4, seed=1, batch_size=3)
    # per-row prefill stacks per-row caches, which sliding-window models cannot do (they always batch)
    prefill_modes = [None] if any(hf.sliding_windows(model)) else [None, True, False]
    with no_transformers_deprecations():
        for per_row in prefill_modes:
            batched = generate(model, tok, DOCS, SHORT_TEMPLATE, settings, per_row_prefill=per_row)
            single = generate(model, tok, DOCS, SHORT_TEMPLATE, dataclasses.replace(settings, batch_size=1),
                              per_row_prefill=per_row)
            assert batched == single


# ---------------------------------------------------------------- model=hf_local / model=hf_hub


def _saved_tiny(tmp_path, tok):
    model = tiny_model("llama", seed=5, vocab_size=len(tok))
    folder = tmp_path / "tiny-llama-local"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, folder


def test_hf_local_loads_a_saved_folder_with_the_same_logits(tmp_path, tok):
    original, folder = _saved_tiny(tmp_path, tok)
    cfg = confdir.load("model", "hf_local")
    cfg.path = str(folder)
    cfg.device = "cpu"
    assert cfg.name == str(folder)  # named after its folder when no name is given
    with no_transformers_deprecations():
        model, loaded_tok, info = loading.load(cfg)
    assert info["source"] == "local" and info["name"] == str(folder) and info["weights_sha256"]
    ids = torch.tensor([loaded_tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, original(ids).logits)
    eng = Engine(model, loaded_tok, sink=cfg.sink, max_context=cfg.max_context)
    with no_transformers_deprecations():
        primed, _ = eng.prime(DOCS[0], surrogate=QUERIES[0])
        assert eng.nll(primed, query=QUERIES[0], answer=ANSWERS[0]).finite
    cfg.name = "my-model"  # an explicit name wins
    assert cfg.name == "my-model" and loading.model_name(cfg) == "my-model"


@pytest.mark.parametrize("path", [None, "", "  "])
def test_hf_local_without_path_is_a_config_error_before_loading(path):
    cfg = confdir.load("model", "hf_local")
    cfg.path = path
    for step in (loading.model_config, loading.load):
        with pytest.raises(ConfigError, match=r"model\.path") as err:
            step(cfg)
        assert "model=hf_local model.path=" in str(err.value) and "\n" not in str(err.value)


def test_hf_local_with_a_folder_that_is_no_model_names_the_setting(tmp_path):
    cfg = confdir.load("model", "hf_local")
    for path in (tmp_path / "missing", tmp_path):
        cfg.path = str(path)
        with pytest.raises(loading.ModelUnavailable, match=r"model\.path"):
            loading.model_config(cfg)


@pytest.mark.parametrize("hub_id", [None, ""])
def test_hf_hub_without_id_is_a_config_error_before_loading(hub_id):
    cfg = confdir.load("model", "hf_hub")
    cfg.id = hub_id
    for step in (loading.model_config, loading.load):
        with pytest.raises(ConfigError, match=r"model\.id") as err:
            step(cfg)
        assert "model=hf_hub model.id=" in str(err.value)


def test_hf_hub_names_the_model_after_its_id_and_keeps_hub_id_working():
    cfg = confdir.load("model", "hf_hub")
    cfg.id = "someorg/some-model"
    assert cfg.name == "someorg/some-model" and loading.model_name(cfg) == "someorg/some-model"
    assert loading.hub_id({"source": "hub", "hub_id": "mistralai/Mistral-7B-Instruct-v0.2"}) == \
        "mistralai/Mistral-7B-Instruct-v0.2"
    mistral = confdir.load("model", "mistral_7b_instruct_v02")
    assert loading.hub_id(mistral) == "mistralai/Mistral-7B-Instruct-v0.2"


def test_cache_keyword_follows_the_forward_signature(tok):
    """``cache`` where the model's forward names it (5.24+), ``past_key_values`` where it names that (5.23)
    or takes only ``**kwargs`` (a wrapper): a ``cache=`` that lands in ``**kwargs`` would be silently dropped."""
    import inspect

    model = tiny_model("llama", vocab_size=len(tok))
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert hf.cache_keyword(model) == hf.cache_keyword(model.base_model) == expected

    class Legacy(torch.nn.Module):  # the 5.23 signature
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return past_key_values

    class Wrapper(torch.nn.Module):
        def forward(self, **kwargs):
            return kwargs

    sentinel = hf.new_cache(model)
    assert hf.call(Legacy(), sentinel, input_ids=None) is sentinel
    assert hf.call(Wrapper(), sentinel)["past_key_values"] is sentinel
    assert "past_key_values" not in hf.call(Wrapper(), None)
