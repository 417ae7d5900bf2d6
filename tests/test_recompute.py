"""Selective recompute (CacheBlend / EPIC) of assembled multi-document caches: the identities of issue 24 in fp32 on
tiny random Llama, Qwen2, Mistral and Gemma3 models (Gemma3: a sliding layer first), against independent
computations (the joint cache, a joint forward over the same ids, the assembled cache)."""

import pytest
import torch
from test_multidoc_builders import max_diff

from kvprime.builders import BUILDERS
from kvprime.builders.conditions import ConditionSpec, validate
from kvprime.builders.engine import Engine
from kvprime.builders.library.recompute import blocks, candidates
from kvprime.cache import hf_internals as hf
from kvprime.cache.recompute import BlendJob, deviation_scores, recompute_batch
from kvprime.cache.segments import Segments, Span
from kvprime.cache.tiny import position_sensitive, tiny_model
from kvprime.errors import ConfigError

VOCAB = 512
ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3": "gemma3_text"}
PREFIX = "{surrogate} "


class _Tok:
    bos_token_id = 1


def engine_for(arch: str, layers: int = 2) -> Engine:
    # Sharpened so that cross-document attention moves entries and NLLs by far more than the tolerances.
    extra = {"num_hidden_layers": layers} if layers != 2 else {}
    if layers != 2 and arch == "gemma3":
        extra["layer_types"] = ["sliding_attention"] + ["full_attention"] * (layers - 1)
    model = tiny_model(ARCHS[arch], seed=1, vocab_size=VOCAB, **extra)
    return Engine(position_sensitive(model, 4.0, 2.0, 4.0), _Tok())


def segs(doc_lens=(11, 17, 9), n_prefix=0, seed=0) -> Segments:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(int(x) for x in torch.randint(3, VOCAB, (n,), generator=g))

    spans = [Span("sink", (1,))]
    for i, n in enumerate(doc_lens):
        if n_prefix:
            spans.append(Span("prefix", ids(n_prefix), f"prefix_{i}", role="cut"))
        spans.append(Span("document", ids(n), f"document_{i}"))
    return Segments(spans=tuple(spans), prompt=ids(6), answer=ids(4))


def bare(s: Segments) -> Segments:
    return Segments(spans=tuple(x for x in s.spans if x.kind != "prefix"), prompt=s.prompt, answer=s.answer)


def spec(builder, **kw) -> ConditionSpec:
    if "primed" in builder:
        s = ConditionSpec("t", builder=builder, surrogate="query", prefix_template=PREFIX, **kw)
    else:
        s = ConditionSpec("t", builder=builder, **kw)
    validate(s, BUILDERS)
    return s


def rel_diff(a, b, lo=0, hi=None) -> float:
    """Largest per-layer max |a - b| over max |b| (keys and values): the sharpened Gemma3's keys reach tens."""
    return max(max((ka[..., lo:hi, :] - kb[..., lo:hi, :]).abs().max().item() / kb[..., lo:hi, :].abs().max().item(),
                   (va[..., lo:hi, :] - vb[..., lo:hi, :]).abs().max().item() / vb[..., lo:hi, :].abs().max().item())
               for (ka, va), (kb, vb) in zip(hf.cache_layers(a), hf.cache_layers(b), strict=True))


def joint_forward(eng, pc):
    """A full prefill over the assembled cache's own ids and positions (the joint cache when sinks are dropped)."""
    return hf.encode(eng.model, torch.tensor([pc.token_ids]), torch.tensor([pc.position_ids]))


BASES = [("independent", 0), ("independent_primed", 5)]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("base, n_prefix", BASES)
@pytest.mark.parametrize("fix", ["rerotate", "shift"])
@pytest.mark.parametrize("rule, knob", [("deviation", {"ratio": 0.0}), ("random", {"ratio": 0.0}),
                                        ("first_k", {"k": 0})])
def test_nothing_recomputed_is_the_assembled_cache_exactly(arch, base, n_prefix, fix, rule, knob):
    eng = engine_for(arch)
    s = segs(n_prefix=n_prefix)
    assembled = eng.build(spec(base, rope_fix=fix), s)
    got = eng.build(spec(f"{base}_recompute", rope_fix=fix, rule=rule, **knob), s)
    assert got.notes["recompute_rows"] == [] and got.notes["query_work"]["recompute_token_layers"] == 0
    assert got.notes["query_work"]["selection_token_layers"] == 0  # no selection pass at ratio 0
    assert max_diff(got.cache, assembled.cache) == 0.0
    assert eng.score(got, s).nll == eng.score(assembled, s).nll


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("base, n_prefix", BASES)
@pytest.mark.parametrize("fix", ["rerotate", "shift"])
def test_all_is_the_joint_cache(arch, base, n_prefix, fix):
    eng = engine_for(arch)
    s = segs(n_prefix=n_prefix)
    joint = eng.build(spec("joint"), bare(s))
    assembled = eng.build(spec(base, rope_fix=fix), s)
    got = eng.build(spec(f"{base}_recompute", rope_fix=fix, rule="all"), s)
    assert got.token_ids == joint.token_ids and got.position_ids == joint.position_ids
    gap = abs(eng.score(assembled, s).nll - eng.score(joint, s).nll)
    assert gap > 1e-2  # the identity below is not trivially true
    assert abs(eng.score(got, s).nll - eng.score(joint, s).nll) <= 1e-4
    assert max_diff(got.cache, joint.cache) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("base, n_prefix", BASES)
def test_all_with_kept_sinks_is_a_joint_forward_over_the_same_ids(arch, base, n_prefix):
    eng = engine_for(arch)
    s = segs((9, 12, 8), n_prefix=n_prefix)  # inside Gemma3's window of 64 with the kept sinks
    got = eng.build(spec(f"{base}_recompute", rope_fix="rerotate", other_sinks="keep", rule="all"), s)
    assert got.token_ids.count(1) == 3  # every document keeps its sink
    assert max_diff(got.cache, joint_forward(eng, got)) <= 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fix", ["rerotate", "shift"])
def test_a_prefix_closed_set_gives_the_joint_entries(arch, fix):
    """S = all of document 1 and nothing after it: S's rows equal the joint cache's, later rows stay stale. Three
    layers: with two, any one token's recompute is exact (layer-0 entries depend on the token and position only)."""
    eng = engine_for(arch, layers=3)
    s = segs()
    sp = spec("independent", rope_fix=fix)
    assembled, joint = eng.build(sp, s), eng.build(spec("joint"), s)
    _, (d1_start, d1_stop), _ = blocks(s, sp, primed=False)
    job = BlendJob(hf.cache_layers(assembled.cache), tuple(assembled.token_ids), tuple(assembled.position_ids),
                   tuple(range(d1_start, d1_stop)))
    out = hf.cache_from_layers(eng.model, recompute_batch(eng.model, [job])[0])
    assert max_diff(assembled.cache, joint.cache, d1_start, d1_stop) > 1e-2  # stale before
    assert rel_diff(out, joint.cache, 0, d1_stop) <= 1e-5
    assert max_diff(out, assembled.cache, d1_stop) == 0.0  # rows outside S are kept as they are
    # Negative: one late token alone reads stale entries before it, so it is not the joint entry.
    late = BlendJob(job.layers, job.ids, job.positions, (len(job.ids) - 1,))
    out = hf.cache_from_layers(eng.model, recompute_batch(eng.model, [late])[0])
    assert max_diff(out, joint.cache, len(job.ids) - 1) > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("rule", ["deviation", "random", "first_k", "all"])
def test_batched_recompute_is_one_sample_at_a_time(arch, rule):
    eng = engine_for(arch)
    builder = BUILDERS["independent_primed_recompute"]
    sp = spec("independent_primed_recompute", rope_fix="rerotate", rule=rule, ratio=0.3, k=4)
    samples = [segs((11, 17, 9), n_prefix=4, seed=0), segs((5, 20), n_prefix=3, seed=1),
               segs((8, 3, 12, 6), n_prefix=4, seed=2)]
    together = builder.build_many(eng, [(s, sp) for s in samples])
    for s, got in zip(samples, together, strict=True):
        alone = eng.build(sp, s)
        assert got.notes["recompute_rows"] == alone.notes["recompute_rows"] and alone.notes["recompute_rows"]
        assert max_diff(got.cache, alone.cache) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_deviation_ranks_by_the_key_distance_to_the_full_attention_pass(arch):
    eng = engine_for(arch)
    s = segs()
    sp = spec("independent", rope_fix="rerotate")
    assembled, joint = eng.build(sp, s), eng.build(spec("joint"), s)
    job = BlendJob(hf.cache_layers(assembled.cache), tuple(assembled.token_ids), tuple(assembled.position_ids))
    (score,) = deviation_scores(eng.model, [job], 1)
    expected = ((joint.cache.layers[1].keys - assembled.cache.layers[1].keys).float() ** 2).sum(dim=(0, 1, 3))
    assert torch.allclose(score, expected.cpu(), rtol=1e-4, atol=1e-6)
    first_doc = blocks(s, sp, primed=False)[0]
    assert score[:first_doc[1]].max() <= 1e-8  # the sink and the first document are already joint-exact
    got = eng.build(spec("independent_recompute", rope_fix="rerotate", rule="deviation", ratio=0.25), s)
    pool = candidates(s, sp, primed=False)
    want = sorted(sorted(pool, key=lambda r: -score[r].item())[:len(pool) // 4])
    assert got.notes["recompute_rows"] == want
    assert got.notes["query_work"]["selection_token_layers"] == 2 * len(assembled.token_ids)


def test_rules_count_the_first_document_as_stated():
    eng = engine_for("llama")
    s = segs(n_prefix=4)
    bare_sp = spec("independent_recompute", rope_fix="rerotate", other_sinks="keep", rule="first_k", k=3)
    got = eng.build(bare_sp, bare(s))
    (_, d0), (b1, _), (b2, _) = blocks(bare(s), bare_sp, primed=False)
    assert got.token_ids[b1] == got.token_ids[b2] == 1  # each later document's kept sink is its first row
    assert got.notes["recompute_rows"] == [b1, b1 + 1, b1 + 2, b2, b2 + 1, b2 + 2]
    assert candidates(bare(s), bare_sp, primed=False) == list(range(d0, len(got.token_ids)))
    primed_sp = spec("independent_primed_recompute", rope_fix="rerotate", rule="first_k", k=3)
    assert candidates(s, primed_sp, primed=True) == list(range(1, 1 + 11 + 17 + 9))  # the primed first document too
    primed = eng.build(primed_sp, s)
    assert primed.notes["recompute_rows"] == [12, 13, 14, 29, 30, 31]  # first_k: documents after the first only


def test_random_is_seeded_per_sample():
    eng = engine_for("llama")
    sp = spec("independent_recompute", rope_fix="rerotate", rule="random", ratio=0.5)
    a, b = segs(seed=0), segs(seed=1)
    first = eng.build(sp, bare(a)).notes["recompute_rows"]
    assert first == eng.build(sp, bare(a)).notes["recompute_rows"]
    assert len(first) == len(candidates(a, sp, primed=False)) // 2
    assert first != eng.build(sp, bare(b)).notes["recompute_rows"]
    other = spec("independent_recompute", rope_fix="rerotate", rule="random", ratio=0.5, seed=7)
    assert first != eng.build(other, bare(a)).notes["recompute_rows"]


def test_query_work_counts_the_recompute_and_the_selection_pass():
    eng = engine_for("llama")
    s = segs()
    got = eng.build(spec("independent_recompute", rope_fix="rerotate", rule="deviation", ratio=0.5), s)
    rows, n, layers = got.notes["recompute_rows"], len(got.token_ids), 2
    work = got.notes["query_work"]
    assert work["recompute_tokens"] == len(rows) == 13
    assert work["recompute_token_layers"] == layers * len(rows)
    assert work["selection_token_layers"] == 2 * n  # layers 0 and 1, every row
    assert work["recompute_key_pairs"] == layers * sum(r + 1 for r in rows) + 2 * n * (n + 1) // 2
    assert work["recompute_s"] > 0
    assert got.encoded_tokens == eng.build(spec("independent", rope_fix="rerotate"), s).encoded_tokens


@pytest.mark.parametrize("bad, says", [({"rule": "oracle"}, "rule='oracle'"), ({"ratio": 1.5}, "ratio=1.5"),
                                       ({"k": -1}, "k=-1"), ({"selection_layer": 0}, "selection_layer=0"),
                                       ({"rope_fix": None}, "rope_fix=None")])
def test_bad_settings_are_refused_before_any_model(bad, says):
    fields = {"builder": "independent_recompute", "rope_fix": "rerotate", **bad}
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(".", r"\.")):
        validate(ConditionSpec.from_config("c", fields), BUILDERS)


def test_a_selection_layer_the_model_lacks_is_refused():
    eng = engine_for("llama")
    with pytest.raises(ConfigError, match="selection_layer=2 is not a layer"):
        eng.build(spec("independent_recompute", rope_fix="rerotate", selection_layer=2), segs())


def test_primed_recompute_needs_a_prefix_and_bare_refuses_one():
    with pytest.raises(ConfigError, match="prefix_template"):
        validate(ConditionSpec("c", builder="independent_primed_recompute", rope_fix="rerotate"), BUILDERS)
    with pytest.raises(ConfigError, match="takes no prefix_template"):
        validate(ConditionSpec("c", builder="independent_recompute", rope_fix="rerotate", surrogate="query",
                               prefix_template=PREFIX), BUILDERS)


@pytest.mark.parametrize("builder, n_prefix", [("independent_recompute", 0), ("independent_primed_recompute", 4)])
@pytest.mark.parametrize("rule", ["deviation", "first_k"])
def test_the_plan_asks_for_every_encode_the_build_runs(builder, n_prefix, rule):
    """The recompute stage's own passes are not encodes: after the planned encodes ran, building encodes nothing."""
    eng = engine_for("llama")
    sp = spec(builder, rope_fix="shift", other_sinks="keep", rule=rule, k=4)
    s = segs(n_prefix=n_prefix)
    eng.prefill(eng.plan(sp, s))
    planned = eng.n_encodes
    assert eng.build(sp, s).notes["recompute_rows"]
    assert eng.n_encodes == planned
