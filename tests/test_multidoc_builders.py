"""The multi-document cache builders (joint, independent, independent_primed): exact identities in fp32 on tiny
random models across RoPE variants. Each compares two independent computations; a wrong slot, sign or sink
breaks it by orders of magnitude more than the tolerance."""

import re

import pytest
import torch
from test_cache_identities import ROPE_VARIANTS
from test_cache_identities import engine_for as single_document_engine
from test_cache_identities import segs as single_document_segs

from kvprime.builders import BUILDERS
from kvprime.builders.conditions import ConditionSpec, validate
from kvprime.builders.engine import Engine
from kvprime.cache import hf_internals as hf
from kvprime.cache.scoring import score_without_cache
from kvprime.cache.segments import Segments, Span
from kvprime.cache.tiny import tiny_model
from kvprime.errors import ConfigError

VOCAB = 512
# The RoPE variants of the single-document identities that the multi-document builders are checked on.
VARIANTS = {name: ROPE_VARIANTS[name] for name in ("llama", "qwen2", "gemma3", "phi_partial_rotary", "yarn_scaling")}


class _Tok:
    bos_token_id = 1


def engine_for(variant: str, sink: str = "bos") -> Engine:
    arch, overrides = VARIANTS[variant]
    return Engine(tiny_model(arch, seed=1, vocab_size=VOCAB, **overrides), _Tok(), sink=sink)


def segs(doc_lens=(11, 17, 9), n_prefix=0, sink=(1,), seed=0) -> Segments:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(int(x) for x in torch.randint(3, VOCAB, (n,), generator=g))

    spans = [Span("sink", sink)] if sink else []
    if n_prefix:
        spans.append(Span("prefix", ids(n_prefix), role="cut"))
    names = ["document"] if len(doc_lens) == 1 else [f"document_{i}" for i in range(len(doc_lens))]
    spans += [Span("document", ids(n), name) for n, name in zip(doc_lens, names, strict=True)]
    return Segments(spans=tuple(spans), prompt=ids(6), answer=ids(4))


def spec(builder, **kw) -> ConditionSpec:
    s = ConditionSpec("t", builder=builder, **kw)
    if builder in ("independent_primed", "truncate_prefix"):
        s = ConditionSpec("t", builder=builder, surrogate="query", prefix_template="{surrogate} ", **kw)
    validate(s, BUILDERS)
    return s


def max_diff(a, b, lo=0, hi=None) -> float:
    return max(max((ka[..., lo:hi, :] - kb[..., lo:hi, :]).abs().max().item(),
                   (va[..., lo:hi, :] - vb[..., lo:hi, :]).abs().max().item())
               for (ka, va), (kb, vb) in zip(hf.cache_layers(a), hf.cache_layers(b), strict=True))


def drop_prefix(s: Segments) -> Segments:
    return Segments(spans=tuple(x for x in s.spans if x.kind != "prefix"), prompt=s.prompt, answer=s.answer)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fix", ["rerotate", "shift"])
def test_one_document_independent_is_the_bare_cache(variant, fix):
    eng = engine_for(variant)
    s = segs(doc_lens=(19,))
    bare = eng.build(spec("full"), s)
    ind = eng.build(spec("independent", rope_fix=fix), s)
    assert ind.token_ids == bare.token_ids and ind.position_ids == bare.position_ids
    assert max_diff(ind.cache, bare.cache) <= 1e-6
    assert abs(eng.score(ind, s).nll - eng.score(bare, s).nll) <= 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fix", ["rerotate", "shift"])
@pytest.mark.parametrize("offset", [0, 13])
def test_one_document_independent_primed_is_truncate_prefix(variant, fix, offset):
    eng = engine_for(variant)
    s = segs(doc_lens=(19,), n_prefix=7)
    trunc = eng.build(spec("truncate_prefix", rope_fix=fix, position_offset=offset), s)
    ind = eng.build(spec("independent_primed", rope_fix=fix, position_offset=offset), s)
    assert ind.token_ids == trunc.token_ids and ind.position_ids == trunc.position_ids
    assert ind.next_position == trunc.next_position and ind.encoded_tokens == trunc.encoded_tokens
    assert max_diff(ind.cache, trunc.cache) <= 1e-6
    assert abs(eng.score(ind, s).nll - eng.score(trunc, s).nll) <= 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("builder, n_prefix", [("independent", 0), ("independent_primed", 5)])
@pytest.mark.parametrize("sinks", ["drop", "keep"])
@pytest.mark.parametrize("offset", [0, 9])
def test_rerotate_equals_shift_with_three_documents(variant, builder, n_prefix, sinks, offset):
    eng = engine_for(variant)
    s = segs(n_prefix=n_prefix)
    rer = eng.build(spec(builder, rope_fix="rerotate", other_sinks=sinks, position_offset=offset), s)
    sh = eng.build(spec(builder, rope_fix="shift", other_sinks=sinks, position_offset=offset), s)
    assert rer.token_ids == sh.token_ids and rer.position_ids == sh.position_ids
    assert max_diff(rer.cache, sh.cache) <= 1e-5  # every layer, keys and values
    # The move is not a no-op: the documents' entries as encoded (at the cache's start), unrotated, differ.
    prefix = s.prefix
    unmoved = []
    for span in s.spans:
        if span.kind == "document":
            ids = s.sink + prefix + span.ids
            enc = eng.encode(ids, list(range(offset, offset + len(ids))))
            unmoved.append((enc, len(ids) - len(span.ids), len(ids), 0))
    if sinks == "drop":
        unmoved.insert(0, (eng.encode(s.sink, [offset]), 0, 1, 0))
        assert max_diff(hf.assemble(eng.model, unmoved), sh.cache) > 1e-3
    assert abs(eng.score(rer, s).nll - eng.score(sh, s).nll) <= 1e-4


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_independent_differs_from_joint_only_in_cross_document_attention(variant):
    eng = engine_for(variant)
    s = segs()
    joint = eng.build(spec("joint"), s)
    ind = eng.build(spec("independent", rope_fix="rerotate"), s)
    first_doc_end = 1 + len(s.spans[1].ids)
    # The sink and the first document see nothing else in either cache ...
    assert max_diff(joint.cache, ind.cache, 0, first_doc_end) <= 1e-5
    # ... the later documents attended to the earlier ones only in the joint cache.
    assert max_diff(joint.cache, ind.cache, first_doc_end) > 1e-3
    # Each later document's entries are those of that document encoded alone at its slot.
    at = first_doc_end
    for span in s.spans[2:]:
        alone = eng.encode((1,) + span.ids, list(range(at - 1, at + len(span.ids))))
        got = hf.assemble(eng.model, [(ind.cache, at, at + len(span.ids), 0)])
        ref = hf.assemble(eng.model, [(alone, 1, 1 + len(span.ids), 0)])
        assert max_diff(got, ref) <= 1e-5
        at += len(span.ids)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_document_ids_and_positions_are_the_same_in_every_mode(variant):
    eng = engine_for(variant)
    s = segs(n_prefix=6)
    bare = drop_prefix(s)
    built = {"joint": eng.build(spec("joint"), bare),
             "independent": eng.build(spec("independent", rope_fix="rerotate"), bare),
             "independent_shift": eng.build(spec("independent", rope_fix="shift"), bare),
             "primed": eng.build(spec("independent_primed", rope_fix="rerotate"), s),
             "primed_shift": eng.build(spec("independent_primed", rope_fix="shift"), s)}
    expected = list(s.sink + s.document)
    for name, pc in built.items():
        assert pc.token_ids == expected, name
        assert pc.position_ids == list(range(len(expected))), name
        assert hf.cache_length(pc.cache) == len(expected), name
    keep = eng.build(spec("independent", rope_fix="rerotate", other_sinks="keep"), bare)
    assert keep.token_ids == [i for span in bare.spans[1:] for i in (1, *span.ids)]
    assert keep.position_ids == list(range(len(keep.token_ids)))


def _full_cache_of_one_document(variant):
    eng, s = single_document_engine(variant), single_document_segs(n_suffix=5)
    return eng, s, eng.build(ConditionSpec("t", builder="full"), s), s.sink + s.prefix + s.document + s.suffix


def _joint_cache_of_several_documents(variant):
    eng, s = engine_for(variant), segs()
    return eng, s, eng.build(spec("joint"), s), s.sink + s.document


FORWARD_PASS_CASES = {"full": (_full_cache_of_one_document, ROPE_VARIANTS),
                      "joint": (_joint_cache_of_several_documents, VARIANTS)}


@pytest.mark.parametrize("cache, variant", [(c, v) for c, (_, vs) in FORWARD_PASS_CASES.items() for v in vs])
def test_nll_from_a_cache_equals_one_forward_pass(cache, variant):
    """The NLL scored from a full cache (one document between a prefix and a suffix) or a joint cache (several
    documents) equals one forward pass over the same ids."""
    eng, s, primed, cached_ids = FORWARD_PASS_CASES[cache][0](variant)
    ids = cached_ids + s.prompt + s.answer
    assert abs(eng.score(primed, s).nll - score_without_cache(eng.model, ids, len(s.answer))) <= 1e-4


def test_without_a_sink_keep_and_drop_agree_and_shift_matches():
    eng = engine_for("llama", sink="none")
    s = segs(sink=())
    drop = eng.build(spec("independent", rope_fix="shift"), s)
    keep = eng.build(spec("independent", rope_fix="rerotate", other_sinks="keep"), s)
    assert drop.token_ids == keep.token_ids == list(s.document)
    assert max_diff(drop.cache, keep.cache) <= 1e-5


def test_independent_primed_primes_every_document():
    eng = engine_for("llama")
    s = segs(n_prefix=8)
    primed = eng.build(spec("independent_primed", rope_fix="rerotate"), s)
    bare = eng.build(spec("independent", rope_fix="rerotate"), drop_prefix(s))
    at = 1
    for span in s.spans[2:]:  # every document's entries changed by its surrogate, not only the first's
        assert max_diff(primed.cache, bare.cache, at, at + len(span.ids)) > 1e-3
        at += len(span.ids)
    assert primed.encoded_tokens == sum(1 + 8 + len(x.ids) for x in s.spans[2:])
    assert primed.notes["surrogate_tokens"] == 3 * 8


def test_planner_asks_for_what_the_builder_encodes():
    eng = engine_for("llama")
    s = segs(n_prefix=4)
    for sp in (spec("independent_primed", rope_fix="shift", other_sinks="keep"),
               spec("independent_primed", rope_fix="rerotate")):
        eng.forget()
        eng.prefill(eng.plan(sp, s))
        before = eng.n_encodes
        eng.build(sp, s)
        assert eng.n_encodes == before  # every encode was planned (and so batched with the chunk's)


def test_bad_settings_and_spans_are_refused():
    with pytest.raises(ConfigError, match="rope_fix=None is not accepted"):
        spec("independent")
    with pytest.raises(ConfigError, match="rope_fix='none' is not accepted"):
        spec("independent", rope_fix="none")
    with pytest.raises(ConfigError, match="other_sinks='some' is not accepted.*drop, keep"):
        spec("independent", rope_fix="shift", other_sinks="some")
    with pytest.raises(ConfigError, match="needs a non-empty prefix_template"):
        validate(ConditionSpec("t", builder="independent_primed", rope_fix="shift"), BUILDERS)
    # Templates a builder cannot honour are refused with the condition, before any model loads.
    for builder, key, reason in [("independent", "prefix_template", "use builder independent_primed"),
                                 ("independent", "suffix_template", "no place for a suffix"),
                                 ("independent_primed", "suffix_template", "no place for a suffix"),
                                 ("joint", "prefix_template", "builder full keeps"),
                                 ("joint", "suffix_template", "builder full keeps")]:
        params = {} if builder == "joint" else {"rope_fix": "shift"}
        templates = {key: "Q: {surrogate}\n"}
        if builder == "independent_primed":
            templates["prefix_template"] = "{surrogate}\n"
        expected = re.escape(f"condition 't': builder {builder} takes no {key} (got 'Q: {{surrogate}}\\n'): ")
        with pytest.raises(ConfigError, match=expected + ".*" + reason):
            validate(ConditionSpec("t", builder=builder, surrogate="query", **params, **templates), BUILDERS)
    eng = engine_for("llama")
    with pytest.raises(ConfigError, match="takes no prefix_template.*independent_primed"):
        eng.build(spec("independent", rope_fix="shift"), segs(n_prefix=3))
    with pytest.raises(ConfigError, match="joint encodes"):
        eng.build(spec("joint"), segs(n_prefix=3))


def test_engine_segments_give_one_span_per_passage(tiny_tok):
    from kvprime.cache.tiny import tiny_model as tm

    eng = Engine(tm("llama", vocab_size=len(tiny_tok)), tiny_tok)
    sp = ConditionSpec("p", builder="independent_primed", rope_fix="shift", surrogate="query",
                       prefix_template="{surrogate} ")
    docs = ["The river flows.", "A tower stands.", "Boats carry grain."]
    seg = eng.segments(sp, document=docs[1], query="Where?", answer="here", surrogate="Where?", documents=docs)
    assert [x.name for x in seg.spans] == ["sink", "prefix", "document_0", "document_1", "document_2"]
    pc = eng.build(sp, seg)
    alone = [eng.segments(ConditionSpec("b"), document=d, query="q", answer="a").document for d in docs]
    assert pc.token_ids == list(eng.sink) + [i for a in alone for i in a]


def test_kept_sinks_count_in_the_context_check():
    """With other_sinks=keep every later document keeps its sink: the cache and the scored positions run two
    entries past the sample's spans here, so a context that holds exactly the spans must refuse the sample."""
    s = segs()  # sink, 3 documents, prompt, answer
    keep, drop = spec("independent", rope_fix="shift", other_sinks="keep"), spec("independent", rope_fix="shift")
    eng = engine_for("llama")
    built = eng.build(keep, s)
    assert len(built) == len(s) - len(s.prompt) - len(s.answer) + 2  # two kept sinks beyond the spans
    assert Engine.context_needed(s, keep) == len(s) + 2 == built.next_position + len(s.prompt) + len(s.answer)
    eng.max_context = len(s)
    assert eng.fits(s, drop) and not eng.fits(s, keep)
    eng.max_context = len(s) + 2
    assert eng.fits(s, keep)
