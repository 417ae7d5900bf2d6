"""Exact identities of the cache engine on tiny random models (fp32), across RoPE variants.

Each identity compares two independent computations; a wrong rotation sign, angle, layout, offset or
segment boundary breaks it by orders of magnitude more than the tolerance.
"""

import pytest
import torch

from kvprime.builders.conditions import ConditionSpec
from kvprime.builders.engine import Engine
from kvprime.cache import hf_internals as hf
from kvprime.cache.scoring import score_without_cache
from kvprime.cache.segments import Segments
from kvprime.cache.tiny import tiny_model

VOCAB = 512
ROPE_VARIANTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "gemma3": ("gemma3_text", {}),
    "phi_partial_rotary": ("phi", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.5}}),
    "llama3_scaling": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}}),
    "yarn_scaling": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 64}}),
    "linear_scaling": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
}


class _Tok:  # the engine only needs a BOS id when segments are built by hand
    bos_token_id = 1


def engine_for(variant: str) -> Engine:
    arch, overrides = ROPE_VARIANTS[variant]
    return Engine(tiny_model(arch, seed=1, vocab_size=VOCAB, **overrides), _Tok())


def segs(n_prefix=7, n_doc=23, n_suffix=0, n_prompt=6, n_answer=4, seed=0) -> Segments:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(int(x) for x in torch.randint(3, VOCAB, (n,), generator=g))

    return Segments(sink=(1,), prefix=ids(n_prefix), document=ids(n_doc), suffix=ids(n_suffix), prompt=ids(n_prompt),
                    answer=ids(n_answer))


def max_diff(a, b) -> float:
    return max(max((ka - kb).abs().max().item(), (va - vb).abs().max().item())
               for (ka, va), (kb, vb) in zip(hf.cache_layers(a), hf.cache_layers(b), strict=True))


def spec(**kw) -> ConditionSpec:
    return ConditionSpec("t", **kw)


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_offset_encode_rerotated_back_equals_encode_at_zero(variant):
    eng = engine_for(variant)
    ids = (1,) + segs().document
    n = 37
    at0 = eng.encode(ids, list(range(len(ids))))
    atn = eng.encode(ids, list(range(n, n + len(ids))))
    assert max_diff(at0, atn) > 1e-3  # the offset really changes the keys ...
    back = hf.assemble(eng.model, [(atn, 0, len(ids), -n)], eng.rope)
    assert max_diff(at0, back) <= 1e-5  # ... and rotating by -N undoes it in every layer


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rerotate_equals_shift(variant):
    eng = engine_for(variant)
    s = segs()
    rer = eng.build(spec(builder="truncate_prefix", rope_fix="rerotate"), s)
    sh = eng.build(spec(builder="truncate_prefix", rope_fix="shift"), s)
    broken = eng.build(spec(builder="truncate_prefix", rope_fix="none"), s)
    assert max_diff(rer.cache, sh.cache) <= 1e-5
    assert max_diff(rer.cache, broken.cache) > 1e-3  # the correction is not a no-op
    assert rer.position_ids == sh.position_ids == list(range(len(s.sink) + len(s.document)))


def test_scoring_counts_every_answer_token_including_the_first():
    eng = engine_for("llama")
    s = segs(n_answer=3)
    primed = eng.build(spec(builder="full"), s)
    score = eng.score(primed, s, per_token=True)
    assert score.n_answer_tokens == 3 and len(score.token_logprobs) == 3
    assert score.nll_sum == pytest.approx(-sum(score.token_logprobs), abs=1e-5)
    # The first answer token alone, scored from a forward pass over everything before it.
    ids = s.sink + s.prefix + s.document + s.prompt + s.answer[:1]
    assert -score.token_logprobs[0] == pytest.approx(score_without_cache(eng.model, ids, 1), abs=1e-4)


def test_scoring_leaves_the_cache_unchanged():
    eng = engine_for("llama")
    s = segs()
    primed = eng.build(spec(builder="truncate_prefix", rope_fix="rerotate"), s)
    before = [(k.clone(), v.clone()) for k, v in hf.cache_layers(primed.cache)]
    first = eng.score(primed, s).nll
    assert hf.cache_length(primed.cache) == len(before[0][0][0, 0])
    for (k0, v0), (k1, v1) in zip(before, hf.cache_layers(primed.cache), strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert eng.score(primed, s).nll == first  # and scoring again gives the same number


def test_truncated_and_bare_caches_hold_the_same_document_ids_and_length():
    eng = engine_for("llama")
    s = segs()
    bare = eng.build(spec(builder="full"), Segments(s.sink, (), s.document, (), s.prompt, s.answer))
    for fix in ("none", "rerotate", "shift"):
        trunc = eng.build(spec(builder="truncate_prefix", rope_fix=fix), s)
        assert len(trunc) == len(bare) == len(s.sink) + len(s.document)
        assert trunc.token_ids == bare.token_ids
        assert trunc.next_position == bare.next_position


def test_uncorrected_truncation_keeps_keys_where_they_were_encoded():
    eng = engine_for("llama")
    s = segs(n_prefix=9)
    broken = eng.build(spec(builder="truncate_prefix", rope_fix="none"), s)
    assert broken.position_ids == [0] + list(range(1 + 9, 1 + 9 + len(s.document)))
    assert broken.next_position == len(broken)  # scoring continues at the cache's end, as in the notebooks


def test_suffix_truncation_equals_the_bare_cache():
    eng = engine_for("llama")
    s = segs(n_prefix=0, n_suffix=8)
    bare = eng.build(spec(builder="full"), Segments(s.sink, (), s.document, (), s.prompt, s.answer))
    cut = eng.build(spec(builder="truncate_suffix"), s)
    assert cut.token_ids == bare.token_ids
    assert max_diff(bare.cache, cut.cache) <= 1e-6
    assert abs(eng.score(bare, s).nll - eng.score(cut, s).nll) <= 1e-5


def test_position_offset_full_cache_scores_like_offset_zero():
    eng = engine_for("llama")
    s = segs(n_prefix=0)
    a = eng.build(spec(builder="full"), s)
    b = eng.build(spec(builder="full", position_offset=20), s)
    assert b.position_ids[0] == 20 and b.next_position == 20 + len(b)
    assert abs(eng.score(a, s).nll - eng.score(b, s).nll) <= 1e-4  # RoPE sees relative positions only


def test_offset_truncation_rerotate_equals_shift():
    eng = engine_for("qwen2")
    s = segs()
    a = eng.build(spec(builder="truncate_prefix", rope_fix="rerotate", position_offset=11), s)
    b = eng.build(spec(builder="truncate_prefix", rope_fix="shift", position_offset=11), s)
    assert max_diff(a.cache, b.cache) <= 1e-5 and a.position_ids == b.position_ids


def test_identical_encodes_run_once():
    eng = engine_for("llama")
    s = segs()
    eng.forget()
    before = eng.n_encodes
    eng.build(spec(builder="full"), s)
    eng.build(spec(builder="full"), s)  # full_oracle and full_oracle_repeat: one encode
    eng.build(spec(builder="truncate_prefix", rope_fix="rerotate"), s)  # cut from that same encode
    assert eng.n_encodes - before == 1
    eng.build(spec(builder="full"), Segments(s.sink, (), s.document, (), s.prompt, s.answer))  # other tokens
    assert eng.n_encodes - before == 2
    eng.forget()
    eng.build(spec(builder="full"), s)
    assert eng.n_encodes - before == 3


def test_dynamic_ntk_scaling_is_refused():
    model = tiny_model("llama", vocab_size=VOCAB, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                   "factor": 2.0})
    eng = Engine(model, _Tok())
    for fix in ("rerotate", "shift"):
        with pytest.raises(hf.RopeUnsupported, match="dynamic"):
            eng.build(spec(builder="truncate_prefix", rope_fix=fix), segs())


def test_gemma3_window_crossing_is_refused():
    eng = engine_for("gemma3")  # sliding window 64 in the tiny config
    with pytest.raises(ValueError, match="sliding attention window of 64"):
        eng.build(spec(builder="truncate_prefix", rope_fix="rerotate"), segs(n_doc=80))


def test_gemma3_layers_use_their_own_frequencies():
    rope = engine_for("gemma3").rope
    local, glob = rope.layers[0], rope.layers[1]
    assert local.sliding_window == 64 and glob.sliding_window is None
    assert not torch.equal(local.inv_freq, glob.inv_freq)


def test_model_without_rope_is_refused_before_loading():
    from transformers import GPT2Config

    with pytest.raises(hf.RopeUnsupported, match="no rotary"):
        hf.check_config_supports(GPT2Config(n_layer=2), "rerotate")
