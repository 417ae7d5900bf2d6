"""``kvprime bench``: kvprime's path against the notebooks' naive path, side by side in one process.

Same model, same samples, same conditions, same surrogates. The naive path does what the notebooks do: one
sample and one condition at a time, every encode through the full model (logits for every position, thrown
away), no encode shared between conditions, a deep copy of the cache before scoring, and separate query and
answer passes (the walkthrough's way); surrogates generated one document at a time, each prompt prefilled whole.
kvprime's path: shared, planned and batched encodes without the LM head, batched scoring over stacked caches,
batched generation continuing every prompt from its template's shared opening. Both must give the same NLLs
(the table reports the largest difference) and the same surrogates.

Beside the plan actually run, the bench counts the minimum-work plan: every distinct (token, position) path of
the run's encodes encoded once (``prefixes.plan_steps`` over all samples, continuing from any shared opening
of one token or more). Its FLOPs bound what any plan of these conditions could save.

FLOPs are counted from the model's shapes and the real (unpadded) tokens each path needed, and compared with
this machine's fp32 matmul throughput measured in the same run.

Then (``recompute=None`` skips it) one selective-recompute condition of ``experiment=blend`` (default
``bare_dev15``) on the same model, data and n, k = 3 passages a sample: ``run_chunk`` given one sample a call
(nothing batched across samples) against ``batch.samples`` a call as the runner chunks them, on the same samples,
with the largest NLL difference, the model forwards each path ran and the builder's query-time work. It runs after
every other number is read, so none of them includes it, and on the bench's loaded model.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..analysis.cost import forward_flops, generation_flops, recompute_flops
from ..builders import BUILDERS
from ..builders.engine import Engine
from ..builders.library.recompute import RecomputeStage
from ..cache import hf_internals as hf
from ..cache import prefixes
from ..config.compose import compose, override_key
from ..errors import ConfigError
from ..files.results_io import write_atomic, write_json
from ..models import loading
from ..pipeline import metadata
from ..pipeline.session import Session, engine_settings
from ..pipeline.sharding import chunk_size
from ..reporting.tables import markdown_table
from ..surrogates.generation import GENERATION_TEMPLATES, generate

# Defaults, not fixed choices: the user's own experiment=, dataset.n_samples= or progress= replaces each.
DEFAULTS = ("experiment=exp01", "dataset.n_samples=20", "progress=false")
# The selective-recompute row times one condition of experiment=blend on the bench's model, data and n.
RECOMPUTE_DEFAULTS = ("experiment=blend", *DEFAULTS[1:])
RECOMPUTE_CONDITION = "bare_dev15"  # blend's independent cache, then CacheBlend's deviation rule at ratio 0.15
# Overrides that describe the bench's own experiment, so the blend session does not take them.
EXPERIMENT_KEYS = ("experiment", "condition", "conditions")


# FLOPs: kvprime.analysis.cost (the same count the reports' cost tables use).


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_size(device) -> int:
    """Side of the square product that measures ``device``: a GPU needs a larger one to fill it."""
    return 8192 if torch.device(device).type == "cuda" else 2048


THROUGHPUT_S = 2.0  # seconds each throughput measurement runs (kvprime bench --throughput-seconds)


def matmul_gflops(device="cpu", dtype=torch.float32, n: int | None = None, seconds: float = THROUGHPUT_S) -> float:
    """fp32 (or ``dtype``) matmul throughput of ``device`` on an ``n``-sided square product, over at least
    ``seconds`` (a shared machine's throughput moves from minute to minute: the bench measures it around each
    stage)."""
    device = torch.device(device)
    n = n or matmul_size(device)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    done, t = 0, time.perf_counter()
    while done < 4 or time.perf_counter() - t < seconds:
        torch.mm(a, b)
        done += 1
        if done % 4 == 0:
            _sync(device)
    _sync(device)
    return 2 * n ** 3 * done / (time.perf_counter() - t) / 1e9


# ---------------------------------------------------------------- the engines
class CountingEngine(Engine):
    """kvprime's engine, noting each encode's work for the FLOP count: (new tokens, past entries they attend to),
    since a continuation after a past of p entries costs more than a fresh encode of its new tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encode_work: list[tuple[int, int]] = []

    def _encode_batch(self, rows):
        self.encode_work += [(len(r.ids), r.past_length) for r in rows]
        return super()._encode_batch(rows)


class NaiveEngine(Engine):
    """The notebooks' way: nothing memoised, every encode through the whole model with all its logits."""

    def encode(self, ids, positions, *, keep: bool = False):
        cache = hf.new_cache(self.model)
        input_ids = torch.tensor([list(ids)], device=self.device)
        with torch.inference_mode():
            hf.call(self.model, cache, input_ids=input_ids, use_cache=True,
                    position_ids=torch.tensor([list(positions)], device=self.device))  # full logits, discarded
        self.n_encodes += 1
        self.encode_lengths.append(len(ids))
        return cache

    def build(self, spec, seg):
        primed = super().build(spec, seg)
        hf.materialize(primed.cache)  # the notebooks assemble each cache as they build it
        return primed


@torch.inference_mode()
def naive_score(model, primed, seg) -> float:
    """Deep copy, then a query pass and an answer pass; NLL over every answer token (defect 2 not repeated)."""
    cache = copy.deepcopy(primed.cache)
    device = next(model.parameters()).device
    start, n_prompt = primed.next_position, len(seg.prompt)
    q = hf.call(model, cache, input_ids=torch.tensor([list(seg.prompt)], device=device),
                position_ids=torch.arange(start, start + n_prompt, device=device)[None], use_cache=True)
    a = hf.call(model, hf.returned_cache(q), input_ids=torch.tensor([list(seg.answer)], device=device),
                position_ids=torch.arange(start + n_prompt, start + n_prompt + len(seg.answer), device=device)[None],
                use_cache=True)
    logits = torch.cat([q.logits[0, -1:], a.logits[0, :-1]]).float()
    target = torch.tensor(list(seg.answer), device=device)
    return float(-torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean())


# ---------------------------------------------------------------- the minimum-work plan
def minimum_plan_flops(config, engine, work, segs) -> float:
    """Encode FLOPs of the cheapest plan of the run's encodes: each distinct (token, position) path once, over
    all samples, every encode continuing from its longest shared opening (even one token: the sink). A lower
    bound for any plan of these conditions, kvprime's included (batching and memory aside)."""
    requests: dict = {}
    for (_, _, spec), seg in zip(work, segs, strict=True):
        for req in engine.plan(spec, seg):
            requests.setdefault(req.key, req)
    steps = prefixes.plan_steps(list(requests.values()), min_shared=1)
    return sum(forward_flops(config, len(s.ids) - s.past, s.past) for s in steps if not s.ready)


# ---------------------------------------------------------------- the selective-recompute row
def recompute_conditions(cfg) -> list[str]:
    """The conditions of a composed config whose builder is a selective-recompute stage."""
    return [name for name, c in (cfg.get("conditions") or {}).items()
            if c and c.get("builder") in BUILDERS and isinstance(BUILDERS[c["builder"]], RecomputeStage)]


def recompute_session(args: list[str], condition: str) -> Session:
    """experiment=blend composed with the bench's overrides (model, data, n, batch sizes; not the ones naming the
    bench's experiment or conditions), planning ``condition`` (and blend's baseline) only."""
    carried = [a for a in args if override_key(a).split(".", 1)[0] not in EXPERIMENT_KEYS]
    cfg = compose(carried, RECOMPUTE_DEFAULTS)
    names = recompute_conditions(cfg)
    if condition not in names:
        raise ConfigError(f"--recompute {condition!r} is not a selective-recompute condition of experiment=blend. "
                          f"Accepted: {', '.join(names)} (conf/experiment/blend.yaml); --no-recompute skips the row.")
    return Session.open(cfg, only=condition)


def recompute_segments(blend: Session, condition: str) -> list:
    """The condition's token spans for every sample, read without a model: a generated surrogate must already be
    in the store (the recompute row never generates one)."""
    blend.surrogate_service.read_stored(blend.samples)
    out = []
    for sample in blend.samples:
        seg = blend.known_segments(sample).get(condition)
        if seg is None:
            raise ConfigError(f"--recompute {condition!r}: the surrogate store lacks the generated surrogates of "
                              f"sample {sample.sample_id!r}, and the bench does not generate them. Run `kvprime "
                              "surrogates generate experiment=blend` with the same overrides first, or pick a bare "
                              f"condition (e.g. {RECOMPUTE_CONDITION}).")
        out.append(seg)
    return out


def _recompute_path(model, tok, settings: dict, work, per_call: int, sizes: dict) -> dict:
    """``work`` through ``run_chunk``, ``per_call`` samples a call, on a fresh engine: seconds, model forwards
    (each forward embeds its input once, so a hook on the embeddings counts them), and per sample the NLL and
    the builder's notes (rows recomputed, query-time work)."""
    engine = Engine(model, tok, **settings)
    forwards = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        t, done = time.perf_counter(), []
        for first in range(0, len(work), per_call):
            done += [(pc.notes, sc.nll) for pc, sc in engine.run_chunk(work[first:first + per_call], **sizes)]
            engine.forget()
        _sync(engine.device)
        seconds = time.perf_counter() - t
    finally:
        hook.remove()
    return {"s": seconds, "forwards": len(forwards), "notes": [n for n, _ in done], "nll": [x for _, x in done]}


def recompute_row(model, tok, blend: Session, condition: str, say) -> dict:
    """One recompute condition on blend's multi-document samples, timed two ways on the same samples: naive = one
    sample per ``run_chunk`` (nothing batched across samples), batched = ``batch.samples`` per call, as the
    runner chunks them. The scored model is the bench's own (the blend session never loads one)."""
    cfg, spec = blend.cfg, blend.specs[condition]
    work = [(spec, seg) for seg in recompute_segments(blend, condition)]
    sizes = {"encode_tokens": cfg["batch"]["encode_tokens"], "score_tokens": cfg["batch"]["score_tokens"]}
    settings, chunk = engine_settings(cfg), chunk_size(cfg)
    _recompute_path(model, tok, settings, work[:1], 1, sizes)  # untimed warm-up of the recompute's own calls
    batched = _recompute_path(model, tok, settings, work, chunk, sizes)
    say(f"  selective recompute ({condition}), batched: {batched['s']:.1f} s ({batched['forwards']} forwards)")
    naive = _recompute_path(model, tok, settings, work, 1, sizes)
    say(f"  selective recompute ({condition}), one sample at a time: {naive['s']:.1f} s "
        f"({naive['forwards']} forwards)")
    work_of = [n.get("query_work") or {} for n in batched["notes"]]

    def total(key, notes=work_of):
        return sum(w.get(key, 0) for w in notes)

    token_layers = total("recompute_token_layers") + total("selection_token_layers")
    return {"experiment": cfg["experiment"]["name"], "condition": condition, "builder": spec.builder,
            "rule": getattr(spec.settings, "rule", None), "samples": len(work),
            "documents_per_sample": cfg["multidoc"]["k"], "samples_per_call": chunk,
            "naive_s": naive["s"], "batched_s": batched["s"], "speedup": naive["s"] / batched["s"],
            "max_abs_nll_diff": max(abs(a - b) for a, b in zip(naive["nll"], batched["nll"], strict=True)),
            "naive_forwards": naive["forwards"], "batched_forwards": batched["forwards"],
            "samples_with_other_rows": sum(a.get("recompute_rows") != b.get("recompute_rows")
                                           for a, b in zip(naive["notes"], batched["notes"], strict=True)),
            "recompute_tokens": total("recompute_tokens"),
            "selection_token_layers": total("selection_token_layers"),
            "recompute_token_layers": total("recompute_token_layers"),
            "recompute_key_pairs": total("recompute_key_pairs"),
            "recompute_gflop": recompute_flops(model.config, token_layers, total("recompute_key_pairs")) / 1e9,
            # The selection and recompute forwards alone (the builder's query_work), within each path's seconds.
            "naive_recompute_s": sum((n.get("query_work") or {}).get("recompute_s", 0) for n in naive["notes"]),
            "batched_recompute_s": total("recompute_s")}


# ---------------------------------------------------------------- the benchmark
def bench(args: list[str], out_dir: Path | None = None, progress: bool = True,
          one_by_one: bool | None = None, recompute: str | None = RECOMPUTE_CONDITION,
          throughput_s: float = THROUGHPUT_S) -> dict:
    """Both paths on the session that ``args`` (Hydra overrides, after ``DEFAULTS``) describe; returns what
    ``bench.json`` holds and, with ``out_dir``, writes it and ``bench.md`` there. ``one_by_one``: also time
    kvprime's path with every cache assembled alone and stacked row by row (None: on a GPU only, where that
    per-cache host work is what bounds a small model). ``recompute``: the experiment=blend condition whose
    selective recompute is timed one sample at a time and in the run's batches (None: no such row).
    ``throughput_s``: how long each of the four matmul-throughput measurements runs."""
    session = Session.from_overrides(args, defaults=DEFAULTS)
    blend = recompute_session(args, recompute) if recompute else None  # its settings checked before any load
    with loading.loading_bars(bool(session.cfg["progress"])):
        return _measure(session, out_dir, progress, one_by_one, blend, recompute, throughput_s)


def _measure(session, out_dir: Path | None, progress: bool, one_by_one: bool | None, blend: Session | None = None,
             recompute: str | None = None, throughput_s: float = THROUGHPUT_S) -> dict:
    cfg, specs, samples = session.cfg, session.specs, session.samples
    service = session.surrogate_service
    model, tok = session.model, session.tokenizer
    config = model.config
    batched_settings = service.generation_settings
    bcfg = cfg["batch"]  # resolved: numbers
    chunk = chunk_size(cfg)
    say = print if progress else (lambda *a, **k: None)
    say(f"kvprime bench: {len(samples)} samples x {len(specs)} conditions of {cfg['experiment']['name']} on "
        f"{cfg['model']['name']} ({next(model.parameters()).device}, {cfg['model'].get('dtype')})")

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    n = matmul_size(device)
    # The throughput a shared or throttled machine gives moves within minutes, so it is measured
    # around each stage (before generation, before and after kvprime's encode+score, after the naive path) and
    # each stage's share is taken against the mean of the two measurements around it.
    peaks = [matmul_gflops(device, dtype, n, throughput_s)]
    say(f"  {str(dtype).removeprefix('torch.')} matmul throughput ({n}^3, torch.mm on {device}): "
        f"{peaks[0]:.1f} GFLOP/s")

    # Generated surrogates: batched vs one document at a time, same seeds, same outputs, on the run's generator
    # (generation.model; the scored model when it is null).
    templates = service.templates()
    gen_model, gen_tok = service.generator.load()[:2] if templates else (model, tok)
    docs = [s.passage for s in samples]
    # Untimed warm-up (kernel selection, allocator, lazy initialisation), so neither path pays for it.
    generate(gen_model, gen_tok, docs[:2], GENERATION_TEMPLATES["target_question"],
             dataclasses.replace(batched_settings, max_new_tokens=2, batch_size=2))
    gen: dict[str, dict[str, Any]] = {"batched": {"s": 0.0, "rows": []}, "single": {"s": 0.0, "rows": []}}
    texts: dict = {}
    for template in templates:
        # "single" is the notebooks' way: one document at a time, each prompt prefilled whole.
        for mode, settings in (("batched", batched_settings),
                               ("single", dataclasses.replace(batched_settings, batch_size=1, shared_prefix=False))):
            stats: dict = {}
            t = time.perf_counter()
            out = generate(gen_model, gen_tok, docs, GENERATION_TEMPLATES[template], settings, stats=stats)
            gen[mode]["s"] += time.perf_counter() - t
            gen[mode]["rows"] += stats.get("rows", [])
            gen[mode].setdefault("shared", []).append(stats.get("shared_prefix_tokens", 0))
            texts.setdefault(template, {})[mode] = out
        say(f"  generated {template!r} surrogates: batched {gen['batched']['s']:.1f} s, "
            f"one at a time {gen['single']['s']:.1f} s")
    identical = all(v["batched"] == v["single"] for v in texts.values())
    # The texts just timed are the run's texts (seeded per document), so the session uses them, not the store.
    for template, v in texts.items():
        service.remember(template, docs, v["batched"])
    service.generator.release()  # a separate generator's weights are not needed to score
    settings = engine_settings(cfg)  # every engine timed is made as the run's engine is
    engine = CountingEngine(model, tok, **settings)
    work = [(s, name, spec) for s in samples for name, spec in specs.items()]
    by_sample = {s.sample_id: session.segments(s) for s in samples}
    segs = [by_sample[s.sample_id][name] for s, name, _ in work]

    # kvprime's path (first, so its peak memory is read before the naive path runs).
    def kvprime_path(eng):
        t, out, per_sample = time.perf_counter(), [], len(specs)
        for first in range(0, len(work), chunk * per_sample):
            part = list(range(first, min(first + chunk * per_sample, len(work))))
            done = eng.run_chunk([(work[i][2], segs[i]) for i in part],
                                 encode_tokens=bcfg["encode_tokens"], score_tokens=bcfg["score_tokens"])
            out += [(len(pc), sc) for pc, sc in done]  # lengths only: holding the caches would inflate peak memory
            eng.forget()
        return out, time.perf_counter() - t

    peaks.append(matmul_gflops(device, dtype, n, throughput_s))
    fast, fast_s = kvprime_path(engine)
    peaks.append(matmul_gflops(device, dtype, n, throughput_s))
    fast_rss = metadata.peak_rss_mb()
    fast_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # A continued encode runs its new tokens against its past: (new, past) pairs, counted exactly.
    fast_flops = sum(forward_flops(config, n, past) for n, past in engine.encode_work) + sum(
        forward_flops(config, len(seg.prompt) + len(seg.answer), cache_len, len(seg.answer) + 1)
        for (cache_len, _), seg in zip(fast, segs, strict=True))
    say(f"  kvprime encode+score: {fast_s:.1f} s ({engine.n_encodes} encodes)")
    per_cache_s = per_cache_diff = None
    if one_by_one or (one_by_one is None and device.type == "cuda"):
        # Where per-cache host work bounds a small model: the same path with each cache assembled alone and copied
        # into its row when stacked (stack_from_spans=False), side by side.
        per_cache, per_cache_s = kvprime_path(Engine(model, tok, stack_from_spans=False, **settings))
        per_cache_diff = max(abs(a.nll - b.nll) for (_, a), (_, b) in zip(fast, per_cache, strict=True))
        say(f"  kvprime encode+score, caches assembled one by one: {per_cache_s:.1f} s")

    # The naive path.
    naive_engine = NaiveEngine(model, tok, **settings)
    t = time.perf_counter()
    slow = []
    for (_, _, spec), seg in zip(work, segs, strict=True):
        primed = naive_engine.build(spec, seg)
        slow.append(naive_score(model, primed, seg))
    slow_s = time.perf_counter() - t
    peaks.append(matmul_gflops(device, dtype, n, throughput_s))
    gen_peak, fast_peak, slow_peak = ((peaks[i] + peaks[i + 1]) / 2 for i in range(3))
    say(f"  naive encode+score: {slow_s:.1f} s ({naive_engine.n_encodes} encodes)")
    score_flops = sum(forward_flops(config, len(seg.prompt) + len(seg.answer), cache_len, len(seg.answer) + 1)
                      for (cache_len, _), seg in zip(fast, segs, strict=True))
    min_flops = minimum_plan_flops(config, engine, work, segs) + score_flops
    diff = max(abs(sc.nll - n) for (_, sc), n in zip(fast, slow, strict=True))
    # The naive path's work: every encode with the LM head on every position, then a query pass and an
    # answer pass (LM head on all their positions) against the copied cache.
    slow_flops = sum(forward_flops(config, n, 0, n) for n in naive_engine.encode_lengths) + sum(
        forward_flops(config, len(seg.prompt), cache_len, len(seg.prompt))
        + forward_flops(config, len(seg.answer), cache_len + len(seg.prompt), len(seg.answer))
        for (cache_len, _), seg in zip(fast, segs, strict=True))

    def gen_flops(mode):
        return (sum(generation_flops(gen_model.config, p, n, shared) for p, n, shared in gen[mode]["rows"])
                + sum(forward_flops(gen_model.config, n, 0, 1) for n in gen[mode].get("shared", []) if n))

    gen_tokens = sum(r[1] for r in gen["batched"]["rows"])
    end_fast, end_slow = fast_s + gen["batched"]["s"], slow_s + gen["single"]["s"]
    result = {
        "model": cfg["model"]["name"], "device": str(next(model.parameters()).device),
        "dtype": cfg["model"].get("dtype"), "experiment": cfg["experiment"]["name"],
        "samples": len(samples), "conditions": len(specs), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "matmul_gflops": sum(peaks) / len(peaks),
        "matmul_gflops_measured": peaks,
        "encode_score": {"naive_s": slow_s, "kvprime_s": fast_s, "speedup": slow_s / fast_s,
                         "naive_encodes": naive_engine.n_encodes, "kvprime_encodes": engine.n_encodes,
                         "naive_encoded_tokens": sum(naive_engine.encode_lengths),
                         "kvprime_encoded_tokens": engine.n_encoded_tokens,
                         "kvprime_continued_encodes": sum(1 for _, past in engine.encode_work if past),
                         "extend_prefixes": engine.extend_prefixes,
                         "max_abs_nll_diff": diff, "useful_gflop": fast_flops / 1e9,
                         "naive_gflop": slow_flops / 1e9, "work_ratio": slow_flops / fast_flops,
                         "minimum_plan_gflop": min_flops / 1e9, "minimum_work_ratio": slow_flops / min_flops,
                         # The speed-up were kvprime's FLOPs run at 100% of the matmul throughput.
                         "ceiling_at_matmul_peak": slow_s / (fast_flops / 1e9 / fast_peak),
                         "naive_share_of_matmul_peak": slow_flops / 1e9 / slow_s / slow_peak,
                         "kvprime_gflops": fast_flops / 1e9 / fast_s,
                         "share_of_matmul_peak": fast_flops / 1e9 / fast_s / fast_peak,
                         "per_cache_assembly_s": per_cache_s, "per_cache_assembly_nll_diff": per_cache_diff},
        "generation": {"templates": templates, "batched_s": gen["batched"]["s"], "single_s": gen["single"]["s"],
                       "generated_tokens": gen_tokens,
                       "batched_tokens_per_s": gen_tokens / gen["batched"]["s"] if gen["batched"]["s"] else None,
                       "single_tokens_per_s": gen_tokens / gen["single"]["s"] if gen["single"]["s"] else None,
                       "speedup": gen["single"]["s"] / gen["batched"]["s"] if gen["batched"]["s"] else None,
                       "identical_outputs": identical,
                       "shared_prefix_tokens": max(gen["batched"].get("shared", [0]) or [0]),
                       "batched_gflop": gen_flops("batched") / 1e9, "single_gflop": gen_flops("single") / 1e9,
                       "share_of_matmul_peak": (gen_flops("batched") / 1e9 / gen["batched"]["s"] / gen_peak
                                                if gen["batched"]["s"] else None)},
        "end_to_end": {"naive_s": end_slow, "kvprime_s": end_fast, "speedup": end_slow / end_fast},
        "peak_rss_mb": {"after_kvprime_path": fast_rss, "after_both": metadata.peak_rss_mb()},
        "peak_gpu_mb": {"after_kvprime_path": fast_gpu,
                        "after_both": (torch.cuda.max_memory_allocated(device) / 2**20
                                       if fast_gpu is not None else None)},
        "batch": {"samples": chunk, "encode_tokens": bcfg["encode_tokens"], "score_tokens": bcfg["score_tokens"],
                  "generation_batch_size": batched_settings.batch_size},
    }
    if blend is not None and recompute is not None:  # after every number above is read: none of them includes it
        result["recompute"] = recompute_row(model, tok, blend, recompute, say)
    md = render(result)
    say("\n" + md)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "bench.json", result)
        write_atomic(out_dir / "bench.md", md)
        say(f"kvprime bench: wrote {out_dir}/bench.json and bench.md")
    return result


def render(r: dict) -> str:
    es, g, e2e = r["encode_score"], r["generation"], r["end_to_end"]
    measured = r.get("matmul_gflops_measured") or [r["matmul_gflops"]]
    throughput = (f"{r['matmul_gflops']:.1f} GFLOP/s" if len(measured) == 1 else
                  f"{', '.join(f'{x:.1f}' for x in measured)} GFLOP/s (before generation, before and after "
                  "kvprime's encode+score, after the naive path)")
    gen_share = "n/a" if g["share_of_matmul_peak"] is None else f"{100 * g['share_of_matmul_peak']:.0f}%"

    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    rows = [
        ("encode + score", f(es["naive_s"], ".1f") + " s", f(es["kvprime_s"], ".1f") + " s", f(es["speedup"]) + "x",
         f"{es['max_abs_nll_diff']:.1e}"),
        ("surrogate generation", f(g["single_s"], ".1f") + " s", f(g["batched_s"], ".1f") + " s",
         f(g["speedup"]) + "x", "identical" if g["identical_outputs"] else "DIFFERENT"),
        ("end to end", f(e2e["naive_s"], ".1f") + " s", f(e2e["kvprime_s"], ".1f") + " s", f(e2e["speedup"]) + "x", ""),
    ]
    if es.get("per_cache_assembly_s"):
        rows.insert(1, ("encode + score, caches assembled one by one", f(es["naive_s"], ".1f") + " s",
                        f(es["per_cache_assembly_s"], ".1f") + " s",
                        f(es["naive_s"] / es["per_cache_assembly_s"]) + "x",
                        f"{es['per_cache_assembly_nll_diff']:.1e}"))
    rc = r.get("recompute")
    if rc:
        rows.append((f"selective recompute ({rc['condition']})", f(rc["naive_s"], ".1f") + " s",
                     f(rc["batched_s"], ".1f") + " s", f(rc["speedup"]) + "x", f"{rc['max_abs_nll_diff']:.1e}"))
    lines = [f"{r['experiment']} on {r['model']} ({r['device']}, {r['dtype']}, {r['torch_threads']} threads): "
             f"{r['samples']} samples x {r['conditions']} conditions", "",
             markdown_table(rows, ["stage", "naive", "kvprime", "speed-up", "max abs NLL diff / outputs"])]
    lines += ["", f"- encodes run: naive {es['naive_encodes']} ({es.get('naive_encoded_tokens', 0):,} tokens), kvprime "
              f"{es['kvprime_encodes']} ({es.get('kvprime_encoded_tokens', 0):,} tokens; "
              f"{es.get('kvprime_continued_encodes', 0)} continued from a shared prefix, "
              f"batch.extend_prefixes={str(es.get('extend_prefixes')).lower()})",
              f"- model work: naive {es['naive_gflop']:.1f} GFLOP "
              f"({100 * es['naive_share_of_matmul_peak']:.0f}% of the "
              f"matmul throughput), kvprime {es['useful_gflop']:.1f} GFLOP: {es['work_ratio']:.2f}x less work (the "
              "speed-up were both paths as efficient as kvprime's)",
              f"- minimum-work plan (every distinct token path encoded once, any shared opening continued): "
              f"{es['minimum_plan_gflop']:.1f} GFLOP, {es['minimum_work_ratio']:.2f}x less than naive: the FLOP-bound "
              f"ceiling of any plan at equal efficiency; kvprime's plan at 100% of the matmul throughput would give "
              f"{es['ceiling_at_matmul_peak']:.2f}x",
              f"- {r['dtype']} matmul throughput measured in this run on {r['device']}: {throughput}; each share "
              "below is of the mean of the two measurements around its stage",
              f"- kvprime encode+score: {es['useful_gflop']:.1f} GFLOP of model work in {es['kvprime_s']:.1f} s = "
              f"{es['kvprime_gflops']:.1f} GFLOP/s, {100 * es['share_of_matmul_peak']:.0f}% of the matmul throughput",
              f"- generation: {g['generated_tokens']} tokens; {f(g['batched_tokens_per_s'], '.1f')} tok/s batched "
              f"(each prompt continuing the template's shared opening of {g.get('shared_prefix_tokens', 0)} tokens) vs "
              f"{f(g['single_tokens_per_s'], '.1f')} tok/s one document at a time, each prompt whole (the notebooks' "
              f"way); batched generation at {gen_share} of the matmul throughput",
              f"- peak resident memory: {r['peak_rss_mb']['after_kvprime_path']:.0f} MB after kvprime's path, "
              f"{r['peak_rss_mb']['after_both']:.0f} MB after both"]
    if rc:
        lines.append(_recompute_line(rc))
    if r.get("peak_gpu_mb", {}).get("after_kvprime_path") is not None:
        lines.append(f"- peak GPU memory allocated: {r['peak_gpu_mb']['after_kvprime_path']:.0f} MB after kvprime's "
                     f"path (generation included), {r['peak_gpu_mb']['after_both']:.0f} MB after both")
    return "\n".join(lines) + "\n"


def _recompute_line(rc: dict) -> str:
    other = rc["samples_with_other_rows"]
    return (f"- selective recompute: condition {rc['condition']} of experiment={rc['experiment']} (rule {rc['rule']}), "
            f"{rc['samples']} samples of {rc['documents_per_sample']} passages, timed after (and not in) the rows "
            f"above; naive: one sample per run_chunk, {rc['naive_forwards']} model forwards; kvprime: "
            f"{rc['samples_per_call']} samples per run_chunk (batch.samples), {rc['batched_forwards']} forwards. "
            f"{rc['recompute_tokens']:,} tokens recomputed, selection pass {rc['selection_token_layers']:,} "
            f"token-layers: {rc['recompute_gflop']:.1f} GFLOP of query-time work; the selection and recompute "
            f"forwards alone took {rc['naive_recompute_s']:.1f} s one at a time, {rc['batched_recompute_s']:.1f} s "
            f"batched" + (f"; {other} samples selected other rows in the two paths" if other else ""))
