"""Selective recompute's identities on the real SmolLM2-135M-Instruct (fp32, CPU), three passages: nothing
recomputed is the assembled cache, ``all`` is the joint cache, a prefix-closed set gives the joint entries, batched is
one sample at a time. Marked slow: it needs the packaged model. Cache errors are per layer and relative (as in
tests/test_real_multidoc.py: the keys' norms reach ~1e2)."""

import pytest
from test_real_multidoc import DOCS, PRIMED, QUERY, TEMPLATES, layer_errors

from kvprime.builders import BUILDERS
from kvprime.builders.conditions import ConditionSpec
from kvprime.builders.library.recompute import blocks
from kvprime.cache import hf_internals as hf
from kvprime.cache.recompute import BlendJob, recompute_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    from kvprime import Engine

    return Engine.load("smollm2_135m_instruct")


def seg_for(engine, spec, docs=DOCS):
    return engine.segments(spec, document=docs[0], query=QUERY, answer="France", surrogate=QUERY, documents=docs)


def cond(builder, **kw):
    extra = PRIMED if "primed" in builder else {}
    return ConditionSpec(builder, builder=builder, rope_fix="rerotate", **extra, **TEMPLATES, **kw)


@pytest.mark.parametrize("base", ["independent", "independent_primed"])
def test_smollm2_recompute_identities(engine, base):
    seg = seg_for(engine, cond(base))
    joint = engine.build(ConditionSpec("j", builder="joint", **TEMPLATES), seg_for(engine, cond("independent")))
    assembled = engine.build(cond(base), seg)
    nothing = engine.build(cond(f"{base}_recompute", rule="deviation", ratio=0.0), seg)
    assert engine.score(nothing, seg).nll == engine.score(assembled, seg).nll
    everything = engine.build(cond(f"{base}_recompute", rule="all"), seg)
    assert abs(engine.score(everything, seg).nll - engine.score(joint, seg).nll) <= 1e-4
    assert max(layer_errors(everything.cache, joint.cache)) <= 1e-5
    # batched = one at a time, on two samples of different lengths
    sp = cond(f"{base}_recompute", rule="deviation", ratio=0.15)
    other = seg_for(engine, sp, [DOCS[2], DOCS[0]])
    together = BUILDERS[sp.builder].build_many(engine, [(seg, sp), (other, sp)])
    for s, got in zip((seg, other), together, strict=True):
        alone = engine.build(sp, s)
        assert got.notes["recompute_rows"] == alone.notes["recompute_rows"]
        assert max(layer_errors(got.cache, alone.cache)) <= 1e-5


def test_smollm2_prefix_closed_recompute_gives_the_joint_entries(engine):
    sp = cond("independent")
    seg = seg_for(engine, sp)
    assembled = engine.build(sp, seg)
    joint = engine.build(ConditionSpec("j", builder="joint", **TEMPLATES), seg)
    _, (start, stop), _ = blocks(seg, sp, primed=False)
    job = BlendJob(hf.cache_layers(assembled.cache), tuple(assembled.token_ids), tuple(assembled.position_ids),
                   tuple(range(start, stop)))
    out = hf.cache_from_layers(engine.model, recompute_batch(engine.model, [job])[0])
    cut = [hf.assemble(engine.model, [(c, 0, stop, 0)]) for c in (out, joint.cache, assembled.cache)]
    assert max(layer_errors(cut[0], cut[1])) <= 1e-5
    assert max(layer_errors(cut[2], cut[1])) > 1e-3  # they were stale before
