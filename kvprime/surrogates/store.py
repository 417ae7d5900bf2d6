"""A disk cache of generated surrogates: one small JSON file per (model, prompt, settings, document).

Generation is the slow part of a generated-surrogate condition and its output is a pure function of the
key (see ``kvprime.surrogates.generation``), so a surrogate is generated once and reused by every later run, resume
or batch size. Entries are written atomically (temp file + ``os.replace``) so a killed run never leaves a
half-written entry behind, and each carries the sha256 of its text: an entry that fails to parse, belongs to
another key or does not match its checksum is deleted with a warning and generated again, never returned.

An entry's ``meta`` is the surrogate's provenance: ``model_id`` (the generating model's, which is also in the
key), ``generator`` (its config name), the template, the settings and the document's sha256, and what its
generation cost: ``prompt_tokens``, ``generated_tokens`` and ``seconds`` (the document's share of its batch's
wall time). Entries written before the cost was recorded lack those three and still load (cost unknown).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import ConfigError
from ..pipeline.results_io import write_atomic
from . import generation
from .generation import GENERATION_TEMPLATES, GenerationSettings, doc_hash


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SurrogateStore:
    def __init__(self, root: Path | str | None = None):
        if root is None:
            # Lazy: importing assets just to build a store elsewhere (tests, notebooks) is not needed.
            from ..assets import home

            root = home() / "surrogates"
        self.root = Path(root)

    def key(self, *, model_id: str, template_name: str, template_text: str, settings: GenerationSettings,
            document: str) -> str:
        payload = {
            "model_id": model_id,
            "template_name": template_name,
            "template_sha256": _sha256(template_text),
            "settings": settings.key(),
            "document_sha256": doc_hash(document),
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return _sha256(canonical)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def entry(self, key: str) -> dict | None:
        """The stored entry (``key``, ``text``, ``text_sha256``, ``meta``), or None; a corrupt one is deleted
        with a warning (it will be regenerated)."""
        path = self.path(key)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        problem = None
        try:
            entry = json.loads(raw)
        except ValueError as exc:
            problem = f"not valid JSON ({exc})"
        else:
            if not isinstance(entry, dict):
                problem = "not a JSON object"
            elif entry.get("key") != key:
                problem = f"holds key {entry.get('key')!r}"
            elif not isinstance(entry.get("text"), str) or not isinstance(entry.get("meta"), dict):
                problem = "missing its text or meta"
            elif entry.get("text_sha256") != _sha256(entry["text"]):
                problem = "text does not match its sha256"
        if problem is None:
            return entry
        warnings.warn(f"surrogate store: deleting corrupt entry {path}: {problem}; it will be regenerated",
                      stacklevel=3)
        path.unlink(missing_ok=True)
        return None

    def get(self, key: str) -> str | None:
        entry = self.entry(key)
        return None if entry is None else entry["text"]

    def put(self, key: str, text: str, meta: dict) -> None:
        entry = {"key": key, "text": text, "text_sha256": _sha256(text), "meta": meta}
        write_atomic(self.path(key), json.dumps(entry, ensure_ascii=False, indent=1))


def cost(meta: Mapping) -> dict:
    """An entry's generation cost: ``prompt_tokens`` (of which ``shared_prompt_tokens`` continued from the
    template's shared prefix, encoded once per run), ``generated_tokens``, ``seconds`` (its share of its batch's
    wall time) and ``generator`` (model id); None for what an entry written before they were recorded lacks."""
    return {"prompt_tokens": meta.get("prompt_tokens"), "shared_prompt_tokens": meta.get("shared_prompt_tokens", 0),
            "generated_tokens": meta.get("generated_tokens"),
            "seconds": meta.get("seconds"), "generator": meta.get("model_id")}


def ensure(store: SurrogateStore, model, tokenizer, *, model_id: str, template_name: str, documents: list[str],
           settings: GenerationSettings, template_text: str | None = None, progress: bool = False,
           load: Callable[[], tuple] | None = None, provenance: Mapping | None = None) -> list[str]:
    """One surrogate per document (input order), generating and storing only those the store lacks.

    ``model_id`` is the generating model's identity (the key). ``load``, if given, returns (model, tokenizer)
    and is called only when something must be generated, so a run whose surrogates are all stored loads no
    generator. ``provenance`` is added to each new entry's meta (e.g. the generator's config name)."""
    if template_text is None:
        if template_name not in GENERATION_TEMPLATES:
            raise ConfigError(f"unknown generation template {template_name!r}. "
                             f"Valid names: {', '.join(sorted(GENERATION_TEMPLATES))}.")
        template_text = GENERATION_TEMPLATES[template_name]
    keys = [store.key(model_id=model_id, template_name=template_name, template_text=template_text,
                      settings=settings, document=d) for d in documents]
    results: list[str | None] = [store.get(k) for k in keys]

    # A document repeated in the input is generated once; its copies share the key and the result.
    missing: dict[str, str] = {}
    for k, d, r in zip(keys, documents, results):
        if r is None and k not in missing:
            missing[k] = d
    if missing:
        if load is not None:
            model, tokenizer = load()
        stats: dict = {}
        # Looked up through the module so tests (and callers) can substitute the generator.
        texts = generation.generate(model, tokenizer, list(missing.values()), template_text, settings,
                                    progress=progress, stats=stats)
        costs = stats.get("documents") or [None] * len(texts)
        for (k, d), text, spent in zip(missing.items(), texts, costs):
            meta = {**dict(provenance or {}), "model_id": model_id, "template_name": template_name,
                    "settings": settings.key(), "document_sha256": doc_hash(d)}
            if spent:
                meta.update(prompt_tokens=int(spent["prompt_tokens"]),
                            shared_prompt_tokens=int(spent.get("shared_prompt_tokens", 0)),
                            generated_tokens=int(spent["generated_tokens"]), seconds=round(spent["seconds"], 6))
            store.put(k, text, meta)
        fresh = dict(zip(missing, texts))
        results = [r if r is not None else fresh[k] for k, r in zip(keys, results)]
    return results  # type: ignore[return-value]
