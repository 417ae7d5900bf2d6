"""``kvprime walkthrough``: the walkthrough notebook's single-example view for any sample.

One sample end to end: its surrogates with their similarity to the query, the caches they prime, which cache
each router picks, every cache's NLL, and the token-by-token probabilities of the answer under the baseline
cache vs the caches the similarity routers pick. The experiment is ``routing`` (the notebook's) unless the
user names another (``experiment=...``); routing's generated surrogates are written by
Qwen2.5-Coder-0.5B-Instruct (its ``generation.model``) whatever model is scored, ``generation.model=null``
makes the scored model write them.
"""

from __future__ import annotations

import math

import pandas as pd

from ..analysis import routing
from ..config.compose import pop_arg
from ..pipeline.session import Session

# A default, not a fixed choice: the user's own experiment= replaces it.
DEFAULTS = ("experiment=routing",)


def walkthrough(args: list[str]) -> dict:
    args = list(args)
    sample_id = pop_arg(args, "sample")
    session = Session.from_overrides(args, defaults=DEFAULTS)
    exp, specs, engine = session.cfg["experiment"], session.specs, session.engine
    sample = session.sample(sample_id)
    texts = session.surrogates(sample)
    sims = session.similarities([sample]).get(sample.sample_id, {})
    segs = session.segments(sample)
    results = {}
    for name, spec in specs.items():
        seg = segs[name]
        score = engine.score(engine.build(spec, seg), seg, per_token=True)
        results[name] = {"surrogate": texts[name], "similarity": sims.get(name), "nll": score.nll,
                         "token_logprobs": score.token_logprobs, "answer_ids": list(seg.answer),
                         "segments": {k: list(getattr(seg, k)) for k in ("sink", "prefix", "document", "suffix",
                                                                         "prompt", "answer")}}
    table = pd.DataFrame([{"sample_id": sample.sample_id, "condition": n, "nll": r["nll"],
                           "similarity": r["similarity"]} for n, r in results.items()])
    rules = exp.get("derived") or []
    picked = routing.derive(table, rules, seed=session.seed)  # the run's own routing rules
    routes = dict(zip(picked["condition"], picked["routed_to"], strict=True))

    baseline = exp["baseline"]
    print(f"sample {sample.sample_id}\n  query:   {sample.query}\n  answer:  {sample.answer}\n"
          f"  passage: {sample.passage[:300]}{'...' if len(sample.passage) > 300 else ''}")
    generator = session.surrogate_service.generation_info()
    if generator is not None:
        print(f"  generated surrogates written by {generator['model']}"
              f"{' (the scored model)' if generator['scored_model'] else ''}")
    print()
    print(f"{'cache':<28}{'similarity':>11}{'NLL':>9}{'delta':>9}  surrogate")
    for name, r in results.items():
        sim = "" if r["similarity"] is None else f"{r['similarity']:.4f}"
        delta = results[baseline]["nll"] - r["nll"]
        print(f"{name:<28}{sim:>11}{r['nll']:>9.4f}{delta:>+9.4f}  {r['surrogate'] or ''}")
    print()
    for router, chosen in routes.items():
        print(f"{router:<18} -> {chosen:<28} NLL {results[chosen]['nll']:.4f} "
              f"(baseline {results[baseline]['nll']:.4f})")
    # The caches a deployed router would use (max similarity), beside the baseline.
    shown = [baseline] + [routes[r["name"]] for r in rules if r["pick"] == "max_similarity" and r["name"] in routes]
    print("\ntoken-by-token probability of the answer (p = exp(log-prob)):")
    print(f"{'token':<16}" + "".join(f"{n[:22]:>24}" for n in shown))
    for i, tid in enumerate(results[baseline]["answer_ids"]):
        cells = "".join(f"{math.exp(results[n]['token_logprobs'][i]):>24.4g}" for n in shown)
        print(f"{session.tokenizer.decode([tid])!r:<16}{cells}")
    return {"sample_id": sample.sample_id, "experiment": exp["name"], "caches": results, "routes": routes,
            "generator": generator}
