"""Batching and shared encodes change no number: batched == one-at-a-time, shared == unshared."""

import pytest
from test_cache_identities import ROPE_VARIANTS, VOCAB, _Tok, engine_for, max_diff, segs

from kvprime.builders.conditions import ConditionSpec
from kvprime.builders.engine import Engine
from kvprime.cache import hf_internals as hf
from kvprime.cache.tiny import tiny_model

SPECS = [ConditionSpec("full", builder="full"),
         ConditionSpec("rerotate", builder="truncate_prefix", rope_fix="rerotate"),
         ConditionSpec("shift", builder="truncate_prefix", rope_fix="shift"),
         ConditionSpec("none", builder="truncate_prefix", rope_fix="none"),
         ConditionSpec("suffix", builder="truncate_suffix"),
         ConditionSpec("offset", builder="full", position_offset=9)]


def samples():
    # Unequal passage, prompt and answer lengths, so every batch is padded on both sides.
    return [segs(n_prefix=2 + 3 * i, n_doc=7 + 11 * i, n_suffix=1 + i, n_prompt=2 + 2 * i, n_answer=1 + (i * 2) % 5,
                 seed=10 + i) for i in range(5)]


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gemma3", "phi_partial_rotary", "yarn_scaling"])
def test_batched_scores_equal_one_at_a_time(variant):
    data = samples()[:3] if variant == "gemma3" else samples()  # the tiny Gemma3's window is 64 tokens
    single = engine_for(variant)
    expected = []
    for s in data:
        expected += [single.score(single.build(spec, s), s).nll for spec in SPECS]
        single.forget()
    batched = engine_for(variant)
    batched.prefill([r for s in data for spec in SPECS for r in batched.plan(spec, s)], batch_tokens=10_000)
    items = [(batched.build(spec, s), s) for s in data for spec in SPECS]
    got = [sc.nll for sc in batched.score_many(items, batch_tokens=10_000)]
    assert len(got) == len(expected) == len(data) * len(SPECS)
    assert max(abs(a - b) for a, b in zip(expected, got, strict=True)) <= 1e-4


def test_batched_encode_equals_single_encode_per_row():
    eng = engine_for("llama")
    S = samples()
    reqs = [r for s in S for r in eng.plan(SPECS[0], s)]
    eng.prefill(reqs, batch_tokens=10_000)
    assert eng.n_encodes == len({r.key for r in reqs})
    ref = engine_for("llama")
    for r in reqs:
        batched = eng.encode(r.ids, r.positions)  # memo hit: the batched encode
        alone = ref.encode(r.ids, r.positions)
        assert hf.cache_length(batched) == len(r.ids)
        assert max_diff(batched, alone) <= 1e-5
    assert eng.n_encodes == len({r.key for r in reqs})  # no encode ran twice


def test_planned_encodes_are_the_distinct_encodes_and_shared_caches_equal_unshared():
    eng = engine_for("llama")
    s = samples()[2]
    reqs = [r for spec in SPECS for r in eng.plan(spec, s)]
    # full/rerotate/none share sink+prefix+document when there is no suffix; here full has a suffix.
    distinct = {r.key for r in reqs}
    eng.prefill(reqs)
    shared = {spec.name: eng.build(spec, s) for spec in SPECS}
    assert eng.n_encodes == len(distinct)
    for spec in SPECS:
        alone = engine_for("llama")  # a fresh engine: nothing memoised, nothing shared
        assert max_diff(alone.build(spec, s).cache, shared[spec.name].cache) <= 1e-5


def test_sliding_window_models_never_batch_past_the_window():
    """The tiny Gemma3 (window 64), continuing encodes from their prefixes: two samples fit the window alone, but
    batched together one's long past beside the other's long new part would be padded past it. Every batch of
    several rows stays inside the window (at most 63 wide), and every cache equals the one a plain engine builds
    alone (a batch padded past the window breaks that)."""
    arch, overrides = ROPE_VARIANTS["gemma3"]
    eng = Engine(tiny_model(arch, seed=1, vocab_size=VOCAB, **overrides), _Tok(), extend_prefixes=True)
    window = min(eng.windows)
    assert window == 64
    batches = []  # (rows, continuing?, padded width) of every encode batch
    real = eng._encode_batch

    def observed(rows):
        batches.append((len(rows), rows[0].past is not None,
                        max(r.past_length for r in rows) + max(len(r.ids) for r in rows)))
        return real(rows)

    eng._encode_batch = observed
    long_past = segs(n_prefix=2, n_doc=45, n_suffix=1, n_prompt=4, n_answer=2, seed=1)
    long_new = segs(n_prefix=2, n_doc=22, n_suffix=20, n_prompt=4, n_answer=2, seed=2)
    data = [samples()[0], long_past, long_new]
    assert all(eng.fits(s, spec) for s in data for spec in SPECS)
    eng.prefill([r for s in data for spec in SPECS for r in eng.plan(spec, s)], batch_tokens=64 * 8)
    assert any(rows > 1 for rows, _, _ in batches)  # batching happened
    assert sum(rows for rows, continuing, _ in batches if continuing) >= 2  # both long samples were continued
    assert all(width <= window - 1 for rows, _, width in batches if rows > 1), batches
    for s in data:
        for spec in SPECS:
            assert max_diff(eng.build(spec, s).cache, engine_for("gemma3").build(spec, s).cache) <= 1e-5, spec.name


@pytest.mark.slow
def test_bench_runs_on_the_tiny_model_and_both_paths_agree(tmp_path, monkeypatch):
    from kvprime.cache import batch_caches
    from kvprime.commands.bench import bench

    stacked = []  # from_spans of every stack: the one-by-one timing must really stack the per-cache way
    real_stack = batch_caches.stack_caches
    monkeypatch.setattr(batch_caches, "stack_caches",
                        lambda *a, **k: stacked.append(k.get("from_spans", True)) or real_stack(*a, **k))
    r = bench(["model=tiny_random_llama", "dataset.n_samples=2", "generation.max_new_tokens=4", "generation.model=null",
               f"generation.store={tmp_path / 'store'}"], out_dir=tmp_path, progress=False, one_by_one=True,
              recompute=None, throughput_s=0.1)  # the recompute row: tests/test_bench_recompute.py
    assert True in stacked and False in stacked
    assert r["encode_score"]["max_abs_nll_diff"] <= 1e-4
    assert r["generation"]["identical_outputs"]
    assert r["encode_score"]["kvprime_encodes"] < r["encode_score"]["naive_encodes"]
    assert (tmp_path / "bench.json").exists() and "speed-up" in (tmp_path / "bench.md").read_text()
    es, g = r["encode_score"], r["generation"]
    # The minimum-work plan bounds kvprime's plan, which bounds the naive path (scoring is in all three).
    assert es["minimum_plan_gflop"] <= es["useful_gflop"] < es["naive_gflop"]
    assert es["minimum_work_ratio"] >= es["work_ratio"] > 1
    # Batched generation continues the shared opening; the notebooks' way prefills each prompt whole.
    assert g["shared_prefix_tokens"] >= 8 and g["batched_gflop"] < g["single_gflop"]
    # The matmul throughput is measured around each stage; each share is against the two measurements around it.
    peaks = r["matmul_gflops_measured"]
    assert len(peaks) == 4 and all(p > 0 for p in peaks)
    assert es["share_of_matmul_peak"] == pytest.approx(es["kvprime_gflops"] / ((peaks[1] + peaks[2]) / 2))
    assert "before and after kvprime's encode+score" in (tmp_path / "bench.md").read_text()
    # The same path with every cache assembled one by one (the way before stacking from spans): same NLLs.
    assert es["per_cache_assembly_s"] > 0 and es["per_cache_assembly_nll_diff"] <= 1e-6
    assert "caches assembled one by one" in (tmp_path / "bench.md").read_text()


def test_minimum_plan_encodes_each_distinct_token_path_once():
    """Two encodes, the second beginning with the first, plus a third sharing only their first 4 tokens at
    the same positions: the minimum plan runs 10 + 10 (continued) + 6 (continued from a 4-token opening)
    tokens, plus the opening's 4 once, whatever order they were planned in."""
    from types import SimpleNamespace

    from kvprime.analysis.cost import forward_flops
    from kvprime.builders import EncodeRequest
    from kvprime.commands.bench import minimum_plan_flops

    a = EncodeRequest(tuple(range(10)), tuple(range(10)))
    b = EncodeRequest(tuple(range(20)), tuple(range(20)))
    c = EncodeRequest(tuple(range(4)) + (99,) * 6, tuple(range(10)))
    plans = {"x": [a, b], "y": [b, c], "z": [a]}  # b planned twice: encoded once
    engine = SimpleNamespace(plan=lambda spec, seg: plans[spec.name])
    work = [(None, n, SimpleNamespace(name=n)) for n in plans]
    config = tiny_config_for_flops()
    expected = (forward_flops(config, 4) + forward_flops(config, 6, 4) + forward_flops(config, 6, 4)
                + forward_flops(config, 10, 10))
    assert minimum_plan_flops(config, engine, work, [None] * 3) == pytest.approx(expected, rel=1e-12)


def tiny_config_for_flops():
    from kvprime.cache.tiny import tiny_config

    return tiny_config("llama")


def test_batched_scoring_on_sliding_layers_stays_inside_the_window():
    """A long cache with a short question batched beside a short cache with a long question: each fits the
    tiny Gemma3's 64-token window alone, but padded together (cache width + input width) they would not."""
    from kvprime.cache.segments import Segments

    eng, ref = engine_for("gemma3"), engine_for("gemma3")
    a = segs(n_prefix=0, n_doc=44, n_prompt=6, n_answer=3, seed=1)    # 45 cached + 9 scored
    b = segs(n_prefix=0, n_doc=8, n_prompt=24, n_answer=6, seed=2)    # 9 cached + 30 scored
    items = [(eng.build(SPECS[0], s), s) for s in (a, b)]
    got = [sc.nll for sc in eng.score_many(items, batch_tokens=10_000)]
    expected = [ref.score(ref.build(SPECS[0], s), s).nll for s in (a, b)]
    assert max(abs(x - y) for x, y in zip(got, expected, strict=True)) <= 1e-4
    assert isinstance(b, Segments)


def test_samples_crossing_the_window_are_skipped_not_fatal():
    eng = engine_for("gemma3")
    long = segs(n_doc=80)
    assert not eng.fits(long, SPECS[0]) and eng.fits(segs(), SPECS[0])
