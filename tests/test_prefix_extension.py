"""Prefix extension: the planner finds every shared prefix, and a continued cache equals a fresh one."""

import json

import pytest
from fixtures.jsonl import write_jsonl
from test_cache_identities import engine_for, max_diff

from kvprime.builders import EncodeRequest
from kvprime.builders.engine import Engine
from kvprime.cache.prefixes import MIN_SHARED_TOKENS, plan_steps
from kvprime.commands.bench import CountingEngine
from kvprime.config.compose import compose
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner


def counting(variant: str) -> CountingEngine:
    plain = engine_for(variant)
    return CountingEngine(plain.model, plain.tokenizer)


def req(ids, start=0, keep=False) -> EncodeRequest:
    ids = tuple(ids)
    return EncodeRequest(ids, tuple(range(start, start + len(ids))), keep)


def test_planner_maps_each_request_to_its_longest_planned_prefix():
    doc = tuple(range(100, 130))                     # 30 tokens
    a = req(doc)                                     # a prefix of b and c
    b = req(doc + (5, 6, 7))
    c = req(doc + (9,) * 12)
    d = req(doc + (9,) * 12 + (4,) * 3)              # c is its longest prefix (a is a shorter one)
    e = req(doc, start=3)                            # the same ids at another offset: no prefix of anything
    f = req(doc[:12] + (7,) * 20)                    # shares a's first 12 tokens: a shared opening, not a request
    g = req((1, 2, 3) + doc[:4])                     # unrelated
    sink = req(doc[:1], keep=True)                   # 1 token: below MIN_SHARED_TOKENS, nobody continues from it
    steps = plan_steps([a, b, c, d, e, f, g, sink])
    by_request = {s.request: s for s in steps if s.request is not None}
    assert set(by_request) == {a, b, c, d, e, f, g, sink}
    assert by_request[b].parent is by_request[a] and by_request[c].parent is by_request[a]
    assert by_request[d].parent is by_request[c]
    assert by_request[e].parent is None and by_request[g].parent is None and by_request[sink].parent is None
    opening = by_request[a].parent  # a and f share their first 12 tokens: encoded once, continued by both
    assert opening is not None and opening.request is None and opening.ids == doc[:12]
    assert by_request[f].parent is opening and opening.parent is None
    # Levels: every step runs after the step it continues from.
    for s in steps:
        assert s.parent is None or s.parent.level < s.level
    assert [s for s in steps if s.request is None] == [opening]


def test_planner_needs_enough_shared_tokens_and_uses_memoised_caches():
    doc = tuple(range(200, 240))
    short = plan_steps([req(doc[:MIN_SHARED_TOKENS - 1] + (1,) * 9), req(doc[:MIN_SHARED_TOKENS - 1] + (2,) * 9)])
    assert all(s.parent is None and s.request is not None for s in short)  # 7 shared tokens: not worth a pass
    longer = req(doc + (3, 4))
    steps = plan_steps([longer], available=[(doc, tuple(range(len(doc))))])
    ready = [s for s in steps if s.ready]
    assert len(ready) == 1 and ready[0].ids == doc
    assert [s.parent for s in steps if s.request is longer] == ready
    assert plan_steps([longer], available=[(doc, tuple(range(1, 1 + len(doc))))])[0].parent is None


def _rows(g):
    import torch

    def ids(n):
        return tuple(int(x) for x in torch.randint(3, 512, (n,), generator=g))

    return ids


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("offset", [0, 13])
def test_extended_caches_equal_fresh_encodes(variant, offset):
    """Pasts of unequal lengths and continuations of unequal lengths, batched: padding on both sides."""
    import torch

    ids = _rows(torch.Generator().manual_seed(5))
    p1, p2, p3 = (1,) + ids(11), (1,) + ids(29), (1,) + ids(18)
    reqs = [req(p1, offset), req(p2, offset), req(p1 + ids(7), offset), req(p2 + ids(15), offset),
            req(p1 + ids(23), offset), req(p3 + ids(4), offset), req(p3 + ids(31), offset)]
    eng, ref = counting(variant), engine_for(variant)
    eng.extend_prefixes = True  # opt-in (batch.extend_prefixes); ref encodes every request from scratch
    eng.prefill(reqs, batch_tokens=10_000)
    continued = [w for w in eng.encode_work if w[1] > 0]
    assert len(continued) == 5  # the three rows after p1/p2, and p3's two after their shared opening
    assert eng.n_encoded_tokens < sum(len(r.ids) for r in reqs)
    for r in reqs:
        got = eng.encode(r.ids, r.positions)  # memo hit
        assert max_diff(got, ref.encode(r.ids, r.positions)) <= 1e-5
        from kvprime.cache import hf_internals as hf
        assert hf.cache_length(got) == len(r.ids)
    # The pasts were not touched by their continuations.
    assert max_diff(eng.encode(p1, reqs[0].positions), ref.encode(p1, reqs[0].positions)) <= 1e-5


def test_extension_off_and_rows_past_a_sliding_window_encode_from_scratch():
    import torch

    ids = _rows(torch.Generator().manual_seed(6))
    base = (1,) + ids(15)
    off = counting("llama")
    off.extend_prefixes = False
    off.prefill([req(base), req(base + ids(6))])
    assert all(ctx == 0 for _, ctx in off.encode_work) and off.n_encoded_tokens == 2 * 16 + 6
    gemma = counting("gemma3")  # window 64: a sliding layer keeps 63 entries
    gemma.extend_prefixes = True
    gemma.prefill([req(base), req(base + ids(6)), req(base + ids(60))])
    assert sorted(gemma.encode_work) == [(6, 16), (16, 0), (76, 0)]


def test_every_encode_runs_through_the_one_encode_method():
    """Memoised single encodes, fresh batches and continuations all reach ``_encode_batch`` (what a subclass
    overrides to count encodes), each once, with their past's length."""
    import torch

    ids = _rows(torch.Generator().manual_seed(7))
    base = (1,) + ids(15)
    eng = counting("llama")
    eng.extend_prefixes = True
    eng.prefill([req(base), req(base + ids(6)), req(ids(9))])
    eng.encode(ids(5), tuple(range(5)))  # a miss outside any plan
    eng.encode(base, tuple(range(16)))  # a memo hit: no encode
    assert sorted(eng.encode_work) == [(5, 0), (6, 16), (9, 0), (16, 0)]
    assert len(eng.encode_work) == eng.n_encodes and sum(n for n, _ in eng.encode_work) == eng.n_encoded_tokens


def test_the_stacking_switch_is_an_engine_argument(monkeypatch):
    """``stack_from_spans=False`` reaches every stack the engine makes (continuations and scoring), and the caches
    it continues equal the default engine's."""
    import torch

    from kvprime.builders import engine as engine_module
    from kvprime.cache import batch_caches

    seen = {"extend": [], "score": []}
    real_extend, real_score = batch_caches.extend_batch, engine_module.score_batch
    monkeypatch.setattr(batch_caches, "extend_batch",
                        lambda *a, **k: seen["extend"].append(k.get("from_spans", True)) or real_extend(*a, **k))
    monkeypatch.setattr(engine_module, "score_batch",
                        lambda *a, **k: seen["score"].append(k.pop("from_spans", True)) or real_score(*a, **k))
    ids = _rows(torch.Generator().manual_seed(8))
    base = (1,) + ids(15)
    reqs = [req(base), req(base + ids(6)), req(base + ids(11))]
    plain = engine_for("llama")
    per_cache = Engine(plain.model, plain.tokenizer, extend_prefixes=True, stack_from_spans=False)
    spans = Engine(plain.model, plain.tokenizer, extend_prefixes=True)
    for eng in (per_cache, spans):
        eng.prefill(reqs, batch_tokens=10_000)
    assert seen["extend"] == [False, True]
    for r in reqs:
        assert max_diff(per_cache.encode(r.ids, r.positions), spans.encode(r.ids, r.positions)) == 0
    from test_cache_identities import segs

    from kvprime.builders.conditions import ConditionSpec

    s, full = segs(), ConditionSpec("full", builder="full")
    for eng in (per_cache, spans):
        eng.score_many([(eng.build(full, s), s), (eng.build(full, segs(seed=1)), segs(seed=1))])
    assert seen["score"] == [False, True]


def _run(experiment, samples_file, tmp_path, name, extend):
    cfg = compose([f"experiment={experiment}", "model=tiny_random_llama", "dataset=jsonl",
                   f"dataset.path={samples_file}", "stats.n_boot=1000", "progress=false", "save_tokens=true",
                   "generation.max_new_tokens=8", "generation.model=null", f"generation.store={tmp_path / 'store'}",
                   "batch.samples=2", f"batch.extend_prefixes={str(extend).lower()}"])
    runner.run_experiment(cfg, tmp_path / name)
    rows = {(r["sample_id"], r["condition"]): r for r in read_jsonl(tmp_path / name / "scores.jsonl")}
    return rows, json.loads((tmp_path / name / "metadata.json").read_text())


@pytest.fixture()
def samples_file(tmp_path):
    # Unequal passage lengths, so the padded batches mix lengths.
    rows = [{"id": f"s{i}", "passage": "The river flows through the old city of France and into the sea. " * (1 + i)
             + f"Boats carry grain {i}.", "query": f"Where does river {i} flow?", "answer": f"into the sea {i}"}
            for i in range(3)]
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("experiment", ["exp01", "routing"])
def test_runs_with_and_without_extension_give_the_same_nlls(experiment, samples_file, tmp_path, stub_similarity):
    on, meta_on = _run(experiment, samples_file, tmp_path, "on", True)
    off, meta_off = _run(experiment, samples_file, tmp_path, "off", False)
    assert on.keys() == off.keys() and len(on) > 0
    assert max(abs(on[k]["nll"] - off[k]["nll"]) for k in on) <= 1e-4
    for k in on:
        assert on[k]["segment_token_ids"] == off[k]["segment_token_ids"]
        assert on[k]["cache_token_ids"] == off[k]["cache_token_ids"]
        assert on[k]["encoded_tokens"] == off[k]["encoded_tokens"]  # the condition's own cost, unchanged
    assert meta_on["encoded_tokens"] < meta_off["encoded_tokens"]
