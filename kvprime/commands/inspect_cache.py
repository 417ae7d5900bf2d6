"""``kvprime inspect``: what exactly is in two conditions' caches for one sample (computed by
``kvprime.pipeline.inspect``, as a run records it for ``experiment.inspect``), printed.

Prints each segment's token ids and the RoPE position ids of the kept entries (the notebook's cache-shape
check: the document must have the same ids and length in every condition), and per layer the cosine
similarity and max |difference| of the document's keys and values between the two caches (the notebook's
value-vector analysis; keys of a correctly re-rotated cache should be compared at equal positions).
"""

from __future__ import annotations

from ..builders import BUILDERS
from ..config.compose import pop_arg
from ..errors import ConfigError
from ..pipeline.inspect import inspect_pair
from ..pipeline.session import Session


def _ids(ids, limit=12) -> str:
    ids = list(ids)
    return " ".join(map(str, ids[:limit])) + (f" ... ({len(ids)})" if len(ids) > limit else "")


def inspect_main(args: list[str]) -> dict:
    args = list(args)
    sample_id, conds = pop_arg(args, "sample"), pop_arg(args, "conditions")
    session = Session.from_overrides(args)
    specs = session.specs
    if conds:
        names = [c.strip() for c in conds.strip("[]").split(",") if c.strip()]
        unknown = [n for n in names if n not in specs]
        if len(names) != 2 or unknown:
            raise ConfigError(f"conditions={conds!r}: give exactly two of this experiment's conditions "
                             f"({', '.join(specs)}), e.g. conditions=[{list(specs)[0]},{list(specs)[-1]}].")
    else:
        # The baseline against the first condition whose builder cuts the prefix out (the notebook's check).
        baseline = session.cfg["experiment"]["baseline"]
        names = [baseline, next((n for n, s in specs.items() if BUILDERS[s.builder].roles.get("prefix") == "cut"),
                                list(specs)[-1])]
    sample = session.sample(sample_id)
    result = inspect_pair(session, sample, names)

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
    if not result["layers"]:
        print(f"\nno per-layer similarity: the document's token ids differ between {na} and {nb} (another "
              "document template), so their entries do not line up")
        return result
    print(f"\nper-layer similarity of the document entries, {na} vs {nb}:")
    print(f"{'layer':>5} {'keys cos':>10} {'keys max|d|':>12} {'values cos':>11} {'values max|d|':>14}")
    for r in result["layers"]:
        print(f"{r['layer']:>5} {r['keys_cos']:>10.6f} {r['keys_max_abs_diff']:>12.3e} {r['values_cos']:>11.6f} "
              f"{r['values_max_abs_diff']:>14.3e}")
    return result
