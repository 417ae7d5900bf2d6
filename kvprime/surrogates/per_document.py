"""Generated surrogates for every passage of a multi-document sample, for builders that prime each document on
its own (``surrogate_per_document``, e.g. ``independent_primed``).

A ``generated:<template>`` surrogate is written for a document; the store keys it on the document's text, so a
distractor's surrogate is the one it gets as any sample's gold passage, and the gold passage's is the sample's
own. The run's records (``inputs.jsonl``, ``scores.jsonl``'s ``surrogate``, the quality table, similarities)
keep the gold passage's text, the one a single-passage run would show; the segments get one per passage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..builders import BUILDERS
from .generation import GENERATION_TEMPLATES
from .sources import generated_template
from .store import cost, ensure


def applies(spec, sample) -> bool:
    """Whether ``spec`` primes each of ``sample``'s passages with its own generated surrogate."""
    info = BUILDERS.get(spec.builder)
    return bool(sample.passages) and info is not None and info.surrogate_per_document \
        and spec.surrogate.startswith("generated:")


def generate(session, samples: Sequence, names: Iterable[str], *, progress: bool = False) -> None:
    """Fill ``session.passage_generated`` ((template, passage) -> text) for every passage these conditions
    prime, from the store or generated and stored where it has none."""
    wanted: dict[str, dict[str, None]] = {}
    for name in names:
        spec = session.specs[name]
        for s in samples:
            if applies(spec, s):
                template = generated_template(spec.surrogate)
                wanted.setdefault(template, {}).update(dict.fromkeys(s.passages))
    gen = session.generator
    for template, passages in sorted(wanted.items()):
        todo = [p for p in passages if (template, p) not in session.passage_generated]
        if not todo:
            continue
        texts = ensure(session.store, None, None, model_id=gen.model_id, template_name=template, documents=todo,
                       settings=session.generation_settings, progress=progress, load=lambda: gen.load()[:2],
                       provenance={"generator": gen.cfg.get("name")})
        session.passage_generated.update({(template, p): t for p, t in zip(todo, texts)})


def texts(session, spec, sample) -> tuple[str, ...] | None:
    """One surrogate per passage in context order, or None when the condition uses one text for the sample."""
    if not applies(spec, sample):
        return None
    template = generated_template(spec.surrogate)
    return tuple(session.passage_generated[(template, p)] for p in sample.passages)


def generation_cost(session, spec, sample) -> dict:
    """What generating the condition's surrogates cost for ``sample``: summed over its passages when each is
    primed with its own, else the sample's own (``Session.generation_cost``)."""
    source = spec.surrogate
    if not applies(spec, sample):
        return session.generation_cost(source.split(":", 1)[1], sample.sample_id)
    template = generated_template(source)
    total: dict = {"prompt_tokens": 0, "shared_prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}
    for passage in dict.fromkeys(sample.passages):
        key = session.store.key(model_id=session.generator.model_id, template_name=template,
                                template_text=GENERATION_TEMPLATES[template], settings=session.generation_settings,
                                document=passage)
        entry = session.store.entry(key)
        one = cost(entry["meta"] if entry else {})
        for k in total:  # unknown for any passage: unknown for the sum
            total[k] = None if total[k] is None or one.get(k) is None else total[k] + one[k]
    total["generator"] = session.generator.model_id
    return total
