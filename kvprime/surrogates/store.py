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

Each entry is generated once however many processes need it at the same time (two ``surrogates generate``, a
run beside them): a process generates only the entries whose lock (``<key>.lock`` beside the entry) it takes
without waiting, and then waits for the others' locks and reads what their holders wrote. Locks are the OS's
(``filelock``), so a killed holder's lock is released with it; its lock file stays, harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from filelock import FileLock, Timeout

from .. import assets
from ..errors import ConfigError
from ..files.results_io import raise_write_error, write_atomic
from . import generation
from .generation import GENERATION_TEMPLATES, GenerationSettings, doc_hash

log = logging.getLogger("kvprime")
# The most entries one process claims at a time: each holds an open lock file until its entry is written, so
# this stays far below the open-file limit while leaving the generator several full batches to sort by length.
CLAIM_AT_MOST = 256


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SurrogateStore:
    def __init__(self, root: Path | str | None = None):
        if root is None:
            root = assets.home() / "surrogates"
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

    def lock_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.lock"

    def lock(self, key: str) -> FileLock:
        """The lock a process holds while it generates ``key``'s entry (see ``ensure``)."""
        return FileLock(str(self.lock_path(key)))

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
    generator. ``provenance`` is added to each new entry's meta (e.g. the generator's config name).
    Entries another process is generating right now are not generated again: this waits for them and reads
    what it wrote (while it waits it holds no lock, so two processes can never wait on each other)."""
    if template_text is None:
        if template_name not in GENERATION_TEMPLATES:
            raise ConfigError(f"unknown generation template {template_name!r}. "
                             f"Valid names: {', '.join(sorted(GENERATION_TEMPLATES))}.")
        template_text = GENERATION_TEMPLATES[template_name]
    keys = [store.key(model_id=model_id, template_name=template_name, template_text=template_text,
                      settings=settings, document=d) for d in documents]
    results: list[str | None] = [store.get(k) for k in keys]

    # A document repeated in the input is generated once; its copies share the key and the result.
    pending: dict[str, str] = {}
    for k, d, r in zip(keys, documents, results, strict=True):
        if r is None and k not in pending:
            pending[k] = d
    fresh: dict[str, str] = {}
    generator = None
    told = False
    while pending:
        held = _claim(store, pending, fresh, max(CLAIM_AT_MOST, settings.batch_size))
        if held:
            try:
                if generator is None:
                    generator = load() if load is not None else (model, tokenizer)
                gen_model, gen_tokenizer = generator
                fresh.update(_generate_and_store(store, gen_model, gen_tokenizer, {k: pending.pop(k) for k in held},
                                                 model_id=model_id, template_name=template_name,
                                                 template_text=template_text, settings=settings,
                                                 progress=progress, provenance=provenance))
            finally:
                for lock in held.values():
                    lock.release()
        elif pending:
            if not told:
                _say(progress, f"waiting for another process generating {len(pending)} of these surrogates into "
                               f"{store.root} (they are read from there when it has written them)")
                told = True
            _wait_for_holder(store, next(iter(pending)))
    return [r if r is not None else fresh[k] for k, r in zip(keys, results, strict=True)]


def _say(progress: bool, msg: str) -> None:
    """A wait the user should know about: on the terminal beside the progress bars, else in the log."""
    if progress:
        print(f"kvprime: {msg}", file=sys.stderr, flush=True)
    else:
        log.info(msg)


def _take(store: SurrogateStore, key: str) -> FileLock | None:
    """``key``'s lock if nobody holds it (never waits, so claiming cannot deadlock), else None."""
    lock = store.lock(key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    except OSError as err:
        raise_write_error(err, store.lock_path(key))
    return lock


def _claim(store: SurrogateStore, pending: dict[str, str], found: dict[str, str], at_most: int) -> dict:
    """Take the locks of up to ``at_most`` pending entries that nobody else is generating; returns them (key ->
    lock). An entry another process wrote in the meantime moves from ``pending`` to ``found``."""
    held: dict[str, FileLock] = {}
    for key in list(pending):
        if len(held) >= at_most:
            break
        lock = _take(store, key)
        if lock is None:
            continue
        text = store.get(key)  # written by a holder that released the lock after we first looked
        if text is None:
            held[key] = lock
            continue
        lock.release()
        found[key] = text
        del pending[key]
    return held


def _wait_for_holder(store: SurrogateStore, key: str) -> None:
    """Block until the process generating ``key`` writes it and lets go (or dies: the OS frees its lock)."""
    lock = store.lock(key)
    try:
        lock.acquire()
    except OSError as err:
        raise_write_error(err, store.lock_path(key))
    lock.release()


def _generate_and_store(store: SurrogateStore, model, tokenizer, todo: dict[str, str], *, model_id: str,
                        template_name: str, template_text: str, settings: GenerationSettings, progress: bool,
                        provenance: Mapping | None) -> dict[str, str]:
    """Generate ``todo`` (key -> document) in batches, store each entry with its provenance and cost; returns
    key -> text."""
    stats: dict = {}
    # Looked up through the module so tests (and callers) can substitute the generator.
    texts = generation.generate(model, tokenizer, list(todo.values()), template_text, settings,
                                progress=progress, stats=stats)
    costs = stats.get("documents") or [None] * len(texts)
    for (k, d), text, spent in zip(todo.items(), texts, costs, strict=True):
        meta = {**dict(provenance or {}), "model_id": model_id, "template_name": template_name,
                "settings": settings.key(), "document_sha256": doc_hash(d)}
        if spent:
            meta.update(prompt_tokens=int(spent["prompt_tokens"]),
                        shared_prompt_tokens=int(spent.get("shared_prompt_tokens", 0)),
                        generated_tokens=int(spent["generated_tokens"]), seconds=round(spent["seconds"], 6))
        store.put(k, text, meta)
    return dict(zip(todo, texts, strict=True))
