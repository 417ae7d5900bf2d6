"""Surrogates as one service: every condition's surrogate text for a sample, the generator that writes the generated
ones, the on-disk store they are read from, the run's donors, per-document surrogates and what generating cost.

A source's declaration (``kvprime.surrogates.sources``) says what its resolver needs; the service gives it exactly
that, computed only when declared (the tokenizer loads for ``random_tokens`` alone, a donor is looked up only for a
source that takes one). A generating source's text is written for a document, its own or its donor's
(``document=``), and, with a builder that primes each document on its own, for each passage (``per_document``):
the service asks the store for every document a set of samples needs, generates what it lacks, and keeps the texts
by (template, document). Everything it reads from the store, the generated texts and their costs alike, goes
through one key (``_key``), so a text and its cost cannot come from different entries.

What it works from is computed once per run, before any model loads (``kvprime.pipeline.plan``): the conditions,
the whole selection, the random-query pool, each source's prepared state and the donors (``PreparedSources``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from ..builders import BUILDERS
from ..data.passages import groups, passage_id
from ..models import loading
from . import sources
from .generation import GENERATION_TEMPLATES, GenerationSettings
from .generator import Generator, model_id
from .store import SurrogateStore, cost, ensure

_COST_KEYS = ("prompt_tokens", "shared_prompt_tokens", "generated_tokens", "seconds")


def _named(value: str | None) -> str:
    """A value that is set wherever generation is involved: a generating source's template (``register_source``
    refuses one without), the document a generated text is asked for, and the text a per-document source gives."""
    assert value is not None
    return value


class SurrogateService:
    """The surrogate texts of one run's conditions. ``tokenizer`` and ``scored_model`` are zero-argument callables
    (the session's tokenizer, and its ``(model, tokenizer, info)``), called only when a source or the generator
    needs them; ``run_cfg`` is the checked run config (its ``generation`` and ``model`` sections)."""

    def __init__(self, specs: Mapping, selection: Sequence, *, pool: Sequence[str], seed: int, grouped: bool,
                 prepared: sources.PreparedSources, run_cfg: Mapping, tokenizer: Callable[[], object],
                 scored_model: Callable[[], tuple]):
        self.specs = specs  # condition name -> ConditionSpec, in run order
        self.selection = selection  # the whole selection (not the shard)
        self.pool = pool
        self.seed = int(seed)
        self.grouped = grouped
        self._states = dict(prepared.states)
        self._donors = prepared.donors
        self._run_cfg = run_cfg
        self._tokenizer = tokenizer
        self._scored_model = scored_model
        self.generated: dict[tuple[str, str], str] = {}  # (template, document) -> generated text
        self._texts: dict[str, dict] = {}  # sample_id -> {condition: surrogate text}

    # ------------------------------------------------------------ the generator and the store

    @cached_property
    def generation_settings(self) -> GenerationSettings:
        g = self._run_cfg["generation"]
        keys = ("temperature", "max_new_tokens", "seed", "batch_size", "clean", "shared_prefix")
        return GenerationSettings(**{k: g[k] for k in keys if k in g})

    @cached_property
    def generator(self) -> Generator:
        """The model that writes generated surrogates; its weights load only when the store lacks something."""
        return Generator(self._run_cfg, shared=self._scored_model)

    @cached_property
    def store(self) -> SurrogateStore:
        root = self._run_cfg["generation"].get("store")
        return SurrogateStore(Path(root).expanduser()) if root else SurrogateStore()

    def templates(self, names: Iterable[str] | None = None) -> list[str]:
        """The generation templates the named conditions (default all) need, sorted."""
        found = (sources.lookup(self.specs[n].surrogate) for n in (self.specs if names is None else names))
        return sorted({arg for info, arg in found if info.generates and arg is not None})

    @property
    def generator_config(self):
        """The generator's HF config (no weights loaded where its files allow); None when nothing is generated."""
        return self.generator.config if self.templates() else None

    def generation_info(self) -> dict | None:
        """What the run's metadata records about generation: the generator (config name, model id, whether it is
        the scored model, dtype, device), the templates and the settings; None when the run generates nothing."""
        if not self.templates():
            return None
        return {**self.generator.describe(), "templates": self.templates(),
                "settings": self.generation_settings.key()}

    def _key(self, template: str, document: str, generator_id: str) -> str:
        """The store key of ``document``'s text under ``template``: the one way this service reads the store."""
        return self.store.key(model_id=generator_id, template_name=template,
                              template_text=GENERATION_TEMPLATES[template], settings=self.generation_settings,
                              document=document)

    @cached_property
    def generator_id_without_weights(self) -> str | None:
        """The generator's store identity when its files give it (a packaged, local or hub model); None for an
        in-process random model, whose identity is a digest of weights that exist only once it is built."""
        info = loading.weights_identity(self.generator.cfg)
        return None if info is None else model_id(self.generator.cfg, info)

    # ------------------------------------------------------------ whose documents

    @property
    def donors(self) -> Mapping[str, str]:
        """sample_id -> donor sample_id over the whole selection (prepared once by the plan)."""
        if self._donors is None:  # no condition takes a donor; asked anyway (a notebook): made here, once
            self._donors = sources.derangement(self.selection, self.seed)
        return self._donors

    @cached_property
    def _by_id(self) -> dict:
        return {s.sample_id: s for s in self.selection}

    def donor(self, sample, info: sources.SourceInfo | None = None):
        """The sample ``sample`` takes from under a donor-taking source (``info``, for the messages)."""
        donor_id = self.donors.get(sample.sample_id)
        if donor_id is None:  # outside the selection (walkthrough sample=<id>): the selection's donors stay
            donor_id = sources.donor_outside(sample, self.selection, self.seed, needed_by=info)
        return self._by_id[donor_id]

    def owner(self, sample, info: sources.SourceInfo):
        """The sample whose document a generating source's text is written for."""
        return self.donor(sample, info) if info.document == "donor" else sample

    def per_document(self, spec, sample) -> bool:
        """Whether the condition gives each of the sample's passages its own generated text."""
        info, _ = sources.lookup(spec.surrogate)
        return info.per_document and bool(sample.passages) and BUILDERS.get(spec.builder).surrogate_per_document

    @cached_property
    def _by_passage(self) -> dict[str, list]:
        return {passage_id(g[0]): g for g in groups(self.selection)}

    def _exclude(self, sample) -> frozenset:
        """Grouped by passage: a passage's own questions are its sibling primers, never its random control."""
        if not self.grouped:
            return frozenset()
        return frozenset(s.query for s in self._by_passage.get(passage_id(sample), ()))

    def _siblings(self, sample) -> list:
        return [s for s in self._by_passage.get(passage_id(sample), ()) if s.sample_id != sample.sample_id]

    def _state(self, source: str):
        if source not in self._states:  # a condition the plan did not prepare (none in a run)
            self._states[source] = sources.prepare(source, self.selection, self.seed)
        return self._states[source]

    # ------------------------------------------------------------ generating

    def _owners(self, samples: Sequence, names: Iterable[str]) -> dict[str, dict[str, str]]:
        """template -> {sample_id: document} of the samples whose generated text the conditions need for
        ``samples`` (each sample's own, or its donor's), in first-needed order."""
        needed: dict[str, dict[str, str]] = {}
        for name in names:
            info, template = sources.lookup(self.specs[name].surrogate)
            if not info.generates:
                continue
            template = _named(template)
            for s in samples:
                owner = self.owner(s, info)
                needed.setdefault(template, {})[owner.sample_id] = owner.passage
        return needed

    def _passages(self, samples: Sequence, names: Iterable[str]) -> dict[str, dict[str, None]]:
        """template -> the passages the conditions prime each with its own generated text, in first-needed order."""
        wanted: dict[str, dict[str, None]] = {}
        for name in names:
            spec = self.specs[name]
            for s in samples:
                if self.per_document(spec, s):
                    template = _named(sources.generated_template(spec.surrogate))
                    wanted.setdefault(template, {}).update(dict.fromkeys(s.passages))
        return wanted

    def _ensure(self, template: str, documents: Iterable[str], progress: bool) -> None:
        """The texts of ``documents`` under ``template``: from the store, generated and stored where it has none."""
        todo = [d for d in dict.fromkeys(documents) if (template, d) not in self.generated]
        if not todo:
            return
        gen = self.generator
        texts = ensure(self.store, None, None, model_id=gen.model_id, template_name=template, documents=todo,
                       settings=self.generation_settings, progress=progress, load=lambda: gen.load()[:2],
                       provenance={"generator": gen.cfg.get("name")})
        self.generated.update({(template, d): t for d, t in zip(todo, texts, strict=True)})

    def generate(self, samples: Sequence, names: Iterable[str] | None = None, *, progress: bool = False) -> dict:
        """(template, sample_id) -> text of every sample whose generated text the conditions (default all) need
        for ``samples`` (donors included); then every passage a per-document condition primes. A document's text
        does not depend on the documents generated with it, so generating one sample gives what a run gives."""
        names = list(self.specs if names is None else names)
        owners = self._owners(samples, names)
        gen = self.generator
        for template, documents in sorted(owners.items()):
            self._ensure(template, documents.values(), progress)
        for template, passages in sorted(self._passages(samples, names).items()):
            self._ensure(template, passages, progress)
        if not gen.is_scored_model:
            gen.release()  # scoring does not need the generator's weights
        return {(t, sid): self.generated[(t, doc)] for t, documents in owners.items() for sid, doc in documents.items()}

    def remember(self, template: str, documents: Sequence[str], texts: Sequence[str]) -> None:
        """Use ``texts`` as the documents' generated texts (the bench times its own generation and scores with it)."""
        self.generated.update({(template, d): t for d, t in zip(documents, texts, strict=True)})

    def read_stored(self, samples: Sequence) -> None:
        """Take what the store already holds for ``samples``, never generating: the texts ``generate`` would read,
        so nothing it later generates differs. Nothing is read when the generator's identity needs its weights."""
        generator_id = self.generator_id_without_weights if self.templates() else None
        if generator_id is None:
            return
        owners = self._owners(samples, self.specs)
        wanted = [*((t, docs.values()) for t, docs in owners.items()), *self._passages(samples, self.specs).items()]
        for template, documents in wanted:
            for document in documents:
                if (template, document) in self.generated:
                    continue
                text = self.store.get(self._key(template, document, generator_id))
                if text is not None:
                    self.generated[(template, document)] = text

    # ------------------------------------------------------------ texts

    def texts(self, sample, names: Iterable[str] | None = None) -> dict:
        """Condition -> surrogate text (None: no surrogate) for ``sample``, generated where needed, resolved once."""
        names = list(self.specs if names is None else names)
        known = self._texts.setdefault(sample.sample_id, {})
        missing = [n for n in names if n not in known]
        if missing:
            self.generate([sample], missing)
            for n in missing:
                known[n] = self.resolve(sample, n)
        return {n: known[n] for n in names}

    def resolve(self, sample, name: str) -> str | None:
        """The condition's text for ``sample`` (the gold passage's, for a per-document one); a generated text must
        be known already (``generate`` or ``read_stored``)."""
        spec = self.specs[name]
        info, template = sources.lookup(spec.surrogate)
        document = self.owner(sample, info).passage if info.generates else None
        return sources.call(spec.surrogate, sample, self._inputs(sample, spec, info, template, document))

    def per_document_texts(self, spec, sample) -> tuple[str, ...] | None:
        """One text per passage in context order, or None when the condition uses one text for the sample."""
        if not self.per_document(spec, sample):
            return None
        info, template = sources.lookup(spec.surrogate)
        return tuple(_named(sources.call(spec.surrogate, sample, self._inputs(sample, spec, info, template, p)))
                     for p in sample.passages)

    def known(self, spec, sample) -> bool:
        """Whether the condition's texts for ``sample`` are known without a model (a generated one: stored)."""
        info, template = sources.lookup(spec.surrogate)
        if not info.generates:
            return True
        documents = [self.owner(sample, info).passage, *(sample.passages if self.per_document(spec, sample) else ())]
        return all((template, d) in self.generated for d in documents)

    def _inputs(self, sample, spec, info: sources.SourceInfo, template: str | None, document: str | None) -> dict:
        """The values of what the source declared it needs (``sources.NEEDS``), each computed only if declared."""
        give = {
            "seed": lambda: self.seed,
            "pool": lambda: self.pool,
            "exclude": lambda: self._exclude(sample),
            "tokenizer": self._tokenizer,
            "n_tokens": lambda: spec.random_tokens,
            "static_set": lambda: sources.STATIC_SURROGATES,
            "selection": lambda: self.selection,
            "state": lambda: self._state(spec.surrogate),
            "siblings": lambda: self._siblings(sample),
            "donor": lambda: self.donor(sample, info),
            "generated": lambda: self._generated_text(_named(template), _named(document)),
        }
        return {need: give[need]() for need in info.needs}

    def _generated_text(self, template: str, document: str) -> str:
        try:
            return self.generated[(template, document)]
        except KeyError:
            raise ValueError(f"no generated {template!r} surrogate for document {document[:60]!r}...; generate the "
                             "run's surrogates first") from None

    # ------------------------------------------------------------ costs

    def document_cost(self, template: str, document: str) -> dict:
        """What generating ``document``'s text under ``template`` cost, from its store entry: ``prompt_tokens``,
        ``shared_prompt_tokens``, ``generated_tokens``, ``seconds`` (None when unknown: an entry written before
        costs were recorded, or a text not in the store) and ``generator`` (model id)."""
        generator_id = self.generator.model_id
        entry = self.store.entry(self._key(template, document, generator_id))
        out = cost(entry["meta"] if entry else {})
        out["generator"] = out["generator"] or generator_id
        return out

    def generation_cost(self, spec, sample) -> dict | None:
        """What the condition's generated texts cost for ``sample`` (None: its source generates nothing): summed over
        its passages when each is primed with its own, else its own document's. A donor's text is the control's, but
        an index would pay for generating the primed document's own, which is what this counts."""
        info, arg = sources.lookup(spec.surrogate)
        if not info.generates:
            return None
        template = _named(arg)
        if not self.per_document(spec, sample):
            return self.document_cost(template, sample.passage)
        total: dict = {"prompt_tokens": 0, "shared_prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}
        for passage in dict.fromkeys(sample.passages):
            one = self.document_cost(template, passage)
            for k in _COST_KEYS:  # unknown for any passage: unknown for the sum
                total[k] = None if total[k] is None or one.get(k) is None else total[k] + one[k]
        total["generator"] = self.generator.model_id
        return total
