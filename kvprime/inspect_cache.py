"""``kvprime inspect``: what exactly is in two conditions' caches for one sample.

Prints each segment's token ids and the RoPE position ids of the kept entries (the notebook's cache-shape
check: the document must have the same ids and length in every condition), and per layer the cosine
similarity and max |difference| of the document's keys and values between the two caches (the notebook's
value-vector analysis; keys of a correctly re-rotated cache should be compared at equal positions).
"""

from __future__ import annotations

import torch

from . import models, surrogates
from .data import load_samples
from .engine import Engine
from .errors import ConfigError
from .runner import plan_conditions


def _pop(args: list[str], key: str):
    for a in list(args):
        if a.startswith(key + "="):
            args.remove(a)
            return a.split("=", 1)[1]
    return None


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from .confdir import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def document_span(primed, seg) -> tuple[int, int]:
    start = 0
    for name in primed.kept_segments:
        if name == "document":
            return start, start + len(seg.document)
        start += len(getattr(seg, name))
    raise ValueError("this cache keeps no document entries")


def compare_caches(a, seg_a, b, seg_b) -> list[dict]:
    """Per layer: cosine similarity and max |diff| of the document's keys and values in two caches."""
    (a0, a1), (b0, b1) = document_span(a, seg_a), document_span(b, seg_b)
    rows = []
    for i, (la, lb) in enumerate(zip(a.cache.layers, b.cache.layers)):
        row = {"layer": i}
        for kind in ("keys", "values"):
            x = getattr(la, kind)[..., a0:a1, :].float().flatten()
            y = getattr(lb, kind)[..., b0:b1, :].float().flatten()
            row[f"{kind}_cos"] = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
            row[f"{kind}_max_abs_diff"] = float((x - y).abs().max())
        rows.append(row)
    return rows


def inspect_pair(engine: Engine, sample, specs: dict, *, pool, seed: int, generated=None) -> dict:
    out = {"sample_id": sample.sample_id, "conditions": {}}
    built = {}
    for name, spec in specs.items():
        sur = surrogates.resolve(spec.surrogate, sample, pool=pool, seed=seed, tokenizer=engine.tokenizer,
                                 n_tokens=spec.random_tokens, generated=generated)
        seg = engine.segments(spec, document=sample.passage, query=sample.query, answer=sample.answer, surrogate=sur)
        primed = engine.build(spec, seg)
        built[name] = (primed, seg)
        out["conditions"][name] = {
            "surrogate": sur,
            "segments": {k: list(getattr(seg, k)) for k in ("sink", "prefix", "document", "suffix", "prompt",
                                                             "answer")},
            "kept_segments": list(primed.kept_segments),
            "cache_len": len(primed),
            "cache_position_ids": primed.position_ids,
            "next_position": primed.next_position,
            "nll": engine.score(primed, seg).nll,
        }
    (na, (pa, sa)), (nb, (pb, sb)) = list(built.items())[:2]
    out["same_document_ids"] = sa.document == sb.document
    out["layers"] = compare_caches(pa, sa, pb, sb)
    return out


def _ids(ids, limit=12) -> str:
    ids = list(ids)
    return " ".join(map(str, ids[:limit])) + (f" ... ({len(ids)})" if len(ids) > limit else "")


def inspect_main(args: list[str]) -> dict:
    args = list(args)
    sample_id, conds = _pop(args, "sample"), _pop(args, "conditions")
    cfg = compose(args)
    specs = plan_conditions(cfg)
    if conds:
        names = [c.strip() for c in conds.strip("[]").split(",") if c.strip()]
        unknown = [n for n in names if n not in specs]
        if len(names) != 2 or unknown:
            raise ConfigError(f"conditions={conds!r}: give exactly two of this experiment's conditions "
                             f"({', '.join(specs)}), e.g. conditions=[{list(specs)[0]},{list(specs)[-1]}].")
    else:
        baseline = cfg["experiment"]["baseline"]
        names = [baseline, next((n for n, s in specs.items() if s.truncates_prefix), list(specs)[-1])]
    specs = {n: specs[n] for n in names}
    dataset = dict(cfg["dataset"])
    selection = load_samples(dataset).samples  # the run's selection: its random queries come from here
    samples = selection if sample_id is None else load_samples({**dataset, "n_samples": None}).samples
    if sample_id is None:
        sample = samples[0]
    else:
        match = [s for s in samples if s.sample_id == sample_id]
        if not match:
            raise ConfigError(f"sample={sample_id!r} is not among dataset {dataset['name']!r}'s usable samples "
                             f"(e.g. {', '.join(s.sample_id for s in samples[:3])}).")
        sample = match[0]
    model, tok, info = models.load(cfg["model"])
    engine = Engine(model, tok, sink=cfg["model"].get("sink", "bos"), max_context=cfg["model"].get("max_context"))
    from .runner import _model_id, generate_surrogates

    generated = generate_surrogates(cfg, specs, [sample], model, tok, _model_id(cfg["model"], info), progress=False)
    result = inspect_pair(engine, sample, specs, pool=[s.query for s in selection], seed=int(cfg.get("seed", 0)),
                          generated=generated)

    print(f"sample {sample.sample_id}\n  query:  {sample.query}\n  answer: {sample.answer}")
    for name, info in result["conditions"].items():
        print(f"\n[{name}] builder={specs[name].builder} rope_fix={specs[name].rope_fix} "
              f"surrogate={info['surrogate']!r}")
        for seg_name, ids in info["segments"].items():
            kept = "kept" if seg_name in info["kept_segments"] else ("scored" if seg_name in ("prompt", "answer")
                                                                     else "cut" if ids else "")
            print(f"  {seg_name:<9}{len(ids):>5} tok  {kept:<7} {_ids(ids)}")
        pos = info["cache_position_ids"]
        print(f"  cache length {info['cache_len']}, positions {pos[:3]}...{pos[-2:]}, scoring from "
              f"{info['next_position']}, NLL {info['nll']:.4f}")
    (na, a), (nb, b) = list(result["conditions"].items())
    print(f"\ncache lengths: {na}={a['cache_len']} {nb}={b['cache_len']}  "
          f"{'[OK] equal' if a['cache_len'] == b['cache_len'] else '[DIFFER]'}; document ids "
          f"{'[OK] identical' if result['same_document_ids'] else '[DIFFER]'}")
    print(f"\nper-layer similarity of the document entries, {na} vs {nb}:")
    print(f"{'layer':>5} {'keys cos':>10} {'keys max|d|':>12} {'values cos':>11} {'values max|d|':>14}")
    for r in result["layers"]:
        print(f"{r['layer']:>5} {r['keys_cos']:>10.6f} {r['keys_max_abs_diff']:>12.3e} {r['values_cos']:>11.6f} "
              f"{r['values_max_abs_diff']:>14.3e}")
    return result
