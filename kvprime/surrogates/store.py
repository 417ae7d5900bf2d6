"""A disk cache of generated surrogates: one small JSON file per (model, prompt, settings, document).

Generation is the slow part of a generated-surrogate condition and its output is a pure function of the
key (see ``kvprime.surrogates.generation``), so a surrogate is generated once and reused by every later run, resume
or batch size. Entries are written atomically (temp file + ``os.replace``) so a killed run never leaves a
half-written entry behind, and each carries the sha256 of its text: an entry that fails to parse, belongs to
another key or does not match its checksum is deleted with a warning and generated again, never returned.
"""

from __future__ import annotations

import hashlib
import json
import warnings
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

    def get(self, key: str) -> str | None:
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
            return entry["text"]
        warnings.warn(f"surrogate store: deleting corrupt entry {path}: {problem}; it will be regenerated",
                      stacklevel=2)
        path.unlink(missing_ok=True)
        return None

    def put(self, key: str, text: str, meta: dict) -> None:
        entry = {"key": key, "text": text, "text_sha256": _sha256(text), "meta": meta}
        write_atomic(self.path(key), json.dumps(entry, ensure_ascii=False, indent=1))


def ensure(store: SurrogateStore, model, tokenizer, *, model_id: str, template_name: str, documents: list[str],
           settings: GenerationSettings, template_text: str | None = None, progress: bool = False) -> list[str]:
    """One surrogate per document (input order), generating and storing only those the store lacks."""
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
        # Looked up through the module so tests (and callers) can substitute the generator.
        texts = generation.generate(model, tokenizer, list(missing.values()), template_text, settings,
                                    progress=progress)
        for (k, d), text in zip(missing.items(), texts):
            store.put(k, text, {"model_id": model_id, "template_name": template_name,
                                "settings": settings.key(), "document_sha256": doc_hash(d)})
        fresh = dict(zip(missing, texts))
        results = [r if r is not None else fresh[k] for k, r in zip(keys, results)]
    return results  # type: ignore[return-value]
