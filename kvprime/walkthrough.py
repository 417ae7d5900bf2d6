"""``kvprime walkthrough``: the walkthrough notebook's single-example view for any sample.

One sample end to end: its static and generated surrogates with their similarity to the query, the caches
they prime, which cache each router picks, every cache's NLL, and the token-by-token probabilities of the
answer under the baseline cache vs the routed caches.
"""

from __future__ import annotations

import math

import pandas as pd

from . import models, routing, surrogates
from .data import load_samples
from .engine import Engine
from .errors import ConfigError
from .inspect_cache import _pop, compose
from .runner import _model_id, _similarities, generate_surrogates, plan_conditions


def walkthrough(args: list[str]) -> dict:
    args = list(args)
    sample_id = _pop(args, "sample")
    cfg = compose(["experiment=routing", *args])
    exp = cfg["experiment"]
    specs = plan_conditions(cfg)
    dataset = dict(cfg["dataset"])
    if sample_id is not None:
        dataset["n_samples"] = None
    samples = load_samples(dataset).samples
    match = [s for s in samples if sample_id in (None, s.sample_id)]
    if not match:
        raise ConfigError(f"sample={sample_id!r} is not among dataset {dataset['name']!r}'s usable samples "
                         f"(e.g. {', '.join(s.sample_id for s in samples[:3])}).")
    sample, seed = match[0], int(cfg.get("seed", 0))
    model, tok, info = models.load(cfg["model"])
    engine = Engine(model, tok, sink=cfg["model"].get("sink", "bos"), max_context=cfg["model"].get("max_context"))
    generated = generate_surrogates(cfg, specs, [sample], model, tok, _model_id(cfg["model"], info), progress=False)
    pool = [s.query for s in samples]
    texts = {sample.sample_id: {n: surrogates.resolve(sp.surrogate, sample, pool=pool, seed=seed, tokenizer=tok,
                                                      n_tokens=sp.random_tokens, generated=generated)
                                for n, sp in specs.items()}}
    sims = _similarities([sample], texts).get(sample.sample_id, {})
    results = {}
    for name, spec in specs.items():
        seg = engine.segments(spec, document=sample.passage, query=sample.query, answer=sample.answer,
                              surrogate=texts[sample.sample_id][name])
        score = engine.score(engine.build(spec, seg), seg, per_token=True)
        results[name] = {"surrogate": texts[sample.sample_id][name], "similarity": sims.get(name), "nll": score.nll,
                         "token_logprobs": score.token_logprobs, "answer_ids": list(seg.answer)}
    table = pd.DataFrame([{"sample_id": sample.sample_id, "condition": n, "nll": r["nll"],
                           "similarity": r["similarity"]} for n, r in results.items()])
    picked = routing.derive(table, exp.get("derived") or [], seed=seed)  # the run's own routing rules
    routes = dict(zip(picked["condition"], picked["routed_to"]))

    baseline = exp["baseline"]
    print(f"sample {sample.sample_id}\n  query:   {sample.query}\n  answer:  {sample.answer}\n"
          f"  passage: {sample.passage[:300]}{'...' if len(sample.passage) > 300 else ''}\n")
    print(f"{'cache':<28}{'similarity':>11}{'NLL':>9}{'delta':>9}  surrogate")
    for name, r in results.items():
        sim = "" if r["similarity"] is None else f"{r['similarity']:.4f}"
        delta = results[baseline]["nll"] - r["nll"]
        print(f"{name:<28}{sim:>11}{r['nll']:>9.4f}{delta:>+9.4f}  {r['surrogate'] or ''}")
    print()
    for router, chosen in routes.items():
        print(f"{router:<18} -> {chosen:<28} NLL {results[chosen]['nll']:.4f} "
              f"(baseline {results[baseline]['nll']:.4f})")
    shown = [baseline] + [routes[r] for r in ("static_routed", "generated_routed") if r in routes]
    print("\ntoken-by-token probability of the answer (p = exp(log-prob)):")
    print(f"{'token':<16}" + "".join(f"{n[:22]:>24}" for n in shown))
    for i, tid in enumerate(results[baseline]["answer_ids"]):
        cells = "".join(f"{math.exp(results[n]['token_logprobs'][i]):>24.4g}" for n in shown)
        print(f"{tok.decode([tid])!r:<16}{cells}")
    return {"sample_id": sample.sample_id, "caches": results, "routes": routes}
