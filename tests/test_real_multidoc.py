"""The multi-document identities on the real SmolLM2-135M-Instruct (fp32, CPU): three SQuAD-like passages.

Marked slow: it needs the packaged model. Errors are per layer, relative (the keys' norms reach ~1e2, so an
absolute 1e-5 would be below fp32's resolution there), as in tests/test_real_smollm2.py.
"""

import pytest

from kvprime.builders.conditions import ConditionSpec
from kvprime.cache import hf_internals as hf
from kvprime.cache.scoring import score_without_cache

pytestmark = pytest.mark.slow

DOCS = ["The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
        "France.",
        "The Amazon rainforest covers much of the Amazon basin of South America, some seven million square "
        "kilometres.",
        "Warsaw is the capital and largest city of Poland, on the Vistula River in east-central Poland."]
QUERY = "In what country is Normandy located?"
TEMPLATES = dict(document_template="Document:\n{document}\n\n", prompt_template="Query: {query}\n\nAnswer:")
PRIMED = dict(surrogate="query", prefix_template="This document may be relevant to queries like: {surrogate}\n\n")


@pytest.fixture(scope="module")
def engine():
    from kvprime import Engine

    return Engine.load("smollm2_135m_instruct")


def layer_errors(a, b) -> list[float]:
    return [max(((ka - kb).norm() / ka.norm()).item(), ((va - vb).norm() / va.norm()).item())
            for (ka, va), (kb, vb) in zip(hf.cache_layers(a), hf.cache_layers(b), strict=True)]


def seg_for(engine, spec, docs):
    return engine.segments(spec, document=docs[0], query=QUERY, answer="France", surrogate=QUERY,
                           documents=docs if len(docs) > 1 else None)


def test_smollm2_multidoc_identities(engine):
    joint = ConditionSpec("j", builder="joint", **TEMPLATES)
    seg = seg_for(engine, joint, DOCS)
    jc = engine.build(joint, seg)
    ids = seg.sink + seg.document + seg.prompt + seg.answer
    assert abs(engine.score(jc, seg).nll - score_without_cache(engine.model, ids, len(seg.answer))) <= 1e-4

    rer = engine.build(ConditionSpec("r", builder="independent", rope_fix="rerotate", **TEMPLATES), seg)
    sh = engine.build(ConditionSpec("s", builder="independent", rope_fix="shift", **TEMPLATES), seg)
    assert max(layer_errors(rer.cache, sh.cache)) <= 1e-5
    assert rer.token_ids == sh.token_ids == jc.token_ids and rer.position_ids == jc.position_ids
    assert abs(engine.score(rer, seg).nll - engine.score(sh, seg).nll) <= 1e-4

    primed = {fix: ConditionSpec(fix, builder="independent_primed", rope_fix=fix, **PRIMED, **TEMPLATES)
              for fix in ("rerotate", "shift")}
    pseg = seg_for(engine, primed["rerotate"], DOCS)
    prer, psh = (engine.build(primed[f], pseg) for f in ("rerotate", "shift"))
    assert max(layer_errors(prer.cache, psh.cache)) <= 1e-5
    assert prer.token_ids == jc.token_ids  # the documents' ids are the same in every mode


def test_smollm2_one_document_reduces_to_the_single_document_builders(engine):
    bare = ConditionSpec("b", builder="full", **TEMPLATES)
    seg = seg_for(engine, bare, DOCS[:1])
    ind = engine.build(ConditionSpec("i", builder="independent", rope_fix="rerotate", **TEMPLATES), seg)
    assert max(layer_errors(ind.cache, engine.build(bare, seg).cache)) <= 1e-6
    for fix in ("rerotate", "shift"):
        trunc = ConditionSpec("t", builder="truncate_prefix", rope_fix=fix, **PRIMED, **TEMPLATES)
        pseg = seg_for(engine, trunc, DOCS[:1])
        ip = engine.build(ConditionSpec("p", builder="independent_primed", rope_fix=fix, **PRIMED, **TEMPLATES), pseg)
        tp = engine.build(trunc, pseg)
        assert max(layer_errors(ip.cache, tp.cache)) <= 1e-6
        assert abs(engine.score(ip, pseg).nll - engine.score(tp, pseg).nll) <= 1e-6
