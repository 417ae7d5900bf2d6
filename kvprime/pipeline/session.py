"""One composed config turned into what every command works from, made one way and each piece once.

``run``, ``inspect``, ``walkthrough``, ``bench`` and ``surrogates generate`` all start here, so they cannot
disagree about a sample: the validated settings and conditions (``kvprime.pipeline.plan.prepare``), this shard's
samples, the random-query pool (the whole selection's queries), the tokenizer and the model's config (read
without weights, for the checks before the model loads), the model (loaded on first use, with that tokenizer),
the Engine, every sample's surrogate text per condition (generated ones through the on-disk store, written
by the generator: ``generation.model``, the scored model by default, loaded only if the store lacks
something) and its token segments per condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from ..builders.engine import Engine
from ..config.compose import compose
from ..data import load_samples
from ..data.passages import groups, passage_id
from ..errors import ConfigError
from ..models import loading
from ..models.embedder import Embedder
from ..surrogates import per_document, sources
from ..surrogates.generation import GENERATION_TEMPLATES, GenerationSettings
from ..surrogates.generator import Generator, model_id
from ..surrogates.store import SurrogateStore, cost, ensure
from .plan import prepare


class Session:
    """Everything a command needs for one config. Build it with ``Session.open(cfg)`` or
    ``Session.from_overrides([...])``; the run builds it from the ``prepare`` it did before claiming its
    directory. Nothing heavy happens until it is asked for: the model loads on first use of ``model``,
    ``engine`` or a surrogate that needs it (``tokenizer`` and ``checks_engine`` need no weights)."""

    def __init__(self, prepared: Mapping):
        self.cfg: dict = prepared["cfg"]  # validated, batch sizes resolved to numbers
        self.specs: dict = prepared["specs"]  # condition name -> ConditionSpec, in run order
        self.only: str | None = prepared.get("only")
        self.loaded = prepared["loaded"]  # the whole selection (LoadResult), rejections included
        self.samples: list = prepared["samples"]  # this shard's
        # Random queries are drawn from the whole selection, so a sample's control does not depend on the
        # shard it lands in, nor on which command looks at it.
        self.pool: list[str] = prepared["pool"]
        # Grouped by passage: a passage's own questions are its sibling primers, never its random control.
        grouped = groups(self.loaded.samples) if prepared.get("grouped") else []
        self._passage_queries: dict[str, set[str]] = {passage_id(g[0]): {s.query for s in g} for g in grouped}
        self.load_data_s: float = prepared.get("load_data_s", 0.0)
        self.seed = int(self.cfg["seed"])
        self.generated: dict = {}  # (template, sample_id) -> text
        self.passage_generated: dict = {}  # (template, passage) -> text, for per-document priming (per_document)
        self._texts: dict = {}  # sample_id -> {condition: surrogate text}
        self._states: dict = {}  # surrogate source -> its prepared state (kvprime.surrogates.sources.prepare)
        self._everything = None  # every usable sample of the dataset, loaded only for sample= outside it

    @classmethod
    def open(cls, cfg, only: str | None = None) -> Session:
        """``cfg`` (composed, OmegaConf or plain) checked as a run checks it, before anything loads."""
        return cls(prepare(cfg, only))

    @classmethod
    def from_overrides(cls, overrides: Sequence[str], defaults: Sequence[str] = (),
                       only: str | None = None) -> Session:
        """Compose ``conf/`` with ``overrides`` (after a command's ``defaults``, which they replace)."""
        return cls.open(compose(overrides, defaults), only)

    # ------------------------------------------------------------ samples

    def sample(self, sample_id: str | None = None):
        """This shard's first sample, or the one named: any usable sample of the dataset can be looked at,
        even outside the selection (its random query still comes from the selection's pool)."""
        if sample_id is None:
            return self.samples[0]
        for s in [*self.samples, *self.loaded.samples]:
            if s.sample_id == sample_id:
                return s
        if self._everything is None:
            self._everything = load_samples({**self.cfg["dataset"], "n_samples": None},
                                            multidoc=self.cfg["multidoc"]).samples
        for s in self._everything:
            if s.sample_id == sample_id:
                return s
        raise ConfigError(f"sample={sample_id!r} is not among dataset {self.cfg['dataset']['name']!r}'s usable "
                          f"samples (e.g. {', '.join(s.sample_id for s in self._everything[:3])}).")

    # ------------------------------------------------------------ model

    @cached_property
    def _tokenizer_and_config(self) -> tuple:
        return loading.tokenizer_and_config(self.cfg["model"])

    @cached_property
    def _model(self) -> tuple:
        return loading.load(self.cfg["model"], tokenizer=self.tokenizer)

    @property
    def model(self):
        return self._model[0]

    @property
    def tokenizer(self):
        """The scored model's tokenizer, read without its weights (the model, once loaded, shares it)."""
        return self._tokenizer_and_config[0]

    @property
    def model_info(self) -> dict:
        """What the run's metadata records about the weights (source, path, sha256, ...)."""
        return self._model[2]

    @property
    def model_id(self) -> str:
        return model_id(self.cfg["model"], self.model_info)

    def new_engine(self, cls=None):
        """A fresh engine (``cls``, default ``Engine``; the bench's naive one) over the session's model."""
        return (cls or Engine)(self.model, self.tokenizer, sink=self.cfg["model"]["sink"],
                               max_context=self.cfg["model"].get("max_context"),
                               extend_prefixes=(self.cfg.get("batch") or {}).get("extend_prefixes", False))

    @cached_property
    def engine(self):
        return self.new_engine()

    @cached_property
    def checks_engine(self):
        """An engine without weights (``segments`` and ``fits`` only): the context and sliding windows come from
        the model's config, so the length checks run before the model loads and agree with the loaded engine's."""
        return Engine(None, self.tokenizer, sink=self.cfg["model"]["sink"],
                      max_context=self.cfg["model"].get("max_context"), config=self._tokenizer_and_config[1])

    # ------------------------------------------------------------ surrogates

    def templates(self, names: Iterable[str] | None = None) -> list[str]:
        """The generation templates the named conditions (default all) need, sorted (``generated:`` and
        ``generated_other:`` sources alike)."""
        specs = [self.specs[n] for n in (self.specs if names is None else names)]
        return sorted({t for s in specs if (t := sources.generated_template(s.surrogate)) is not None})

    @cached_property
    def generation_settings(self):
        g = self.cfg["generation"]
        return GenerationSettings(**{k: g[k] for k in ("temperature", "max_new_tokens", "seed", "batch_size", "clean",
                                                          "shared_prefix")
                                     if k in g})

    @cached_property
    def generator(self):
        """The model that writes generated surrogates (``kvprime.surrogates.generator.Generator``); its weights
        load only when something is not in the store."""
        return Generator(self.cfg, shared=lambda: self._model)

    @property
    def generator_config(self):
        """The generator's HF config (read from its files, no weights loaded where that is possible); None when
        the run has no generated surrogate."""
        return self.generator.config if self.templates() else None

    def generation_info(self) -> dict | None:
        """What the run's metadata records about generation: the generator (config name, model id, whether it
        is the scored model, dtype, device) and the templates; None when the run generates nothing."""
        if not self.templates():
            return None
        return {**self.generator.describe(), "templates": self.templates(),
                "settings": self.generation_settings.key()}

    @cached_property
    def store(self):
        root = self.cfg["generation"].get("store")
        return SurrogateStore(Path(root).expanduser()) if root else SurrogateStore()

    @cached_property
    def donors(self) -> dict:
        """sample_id -> donor sample_id of ``generated_other`` over the whole selection (not the shard), so
        every shard and command gives a sample the same donor."""
        return sources.derangement(self.loaded.samples, self.seed)

    def donor(self, sample):
        """The sample whose generated surrogate ``sample`` gets under ``generated_other``."""
        donor_id = self.donors.get(sample.sample_id)
        if donor_id is None:  # outside the selection (walkthrough sample=<id>): the selection's donors stay
            donor_id = sources.donor_outside(sample, self.loaded.samples, self.seed)
        return next(s for s in self.loaded.samples if s.sample_id == donor_id)

    def source_state(self, source: str):
        """A source's per-run state over the whole selection (``sibling_query``'s siblings), computed once."""
        if source not in self._states:
            self._states[source] = sources.prepare(source, self.loaded.samples, self.seed)
        return self._states[source]

    def _needed(self, samples: Sequence, names: Iterable[str] | None) -> dict[str, dict]:
        """template -> {sample_id: sample} whose generated text the conditions need for ``samples``: the
        samples themselves (``generated:``) and their donors (``generated_other:``)."""
        needed: dict[str, dict] = {}
        for name in self.specs if names is None else names:
            source = self.specs[name].surrogate
            template = sources.generated_template(source)
            if template is None:
                continue
            other = source.startswith("generated_other:")
            for s in samples:
                d = self.donor(s) if other else s
                needed.setdefault(template, {})[d.sample_id] = d
        return needed

    def generate(self, samples: Sequence | None = None, names: Iterable[str] | None = None, *,
                 progress: bool = False) -> dict:
        """(template, sample_id) -> text for every document the conditions (default all) need for the samples
        (default this shard's; ``generated_other`` needs the donors' too): read from the store, generated and
        stored where it has none. A document's surrogate does not depend on the documents generated with it,
        so generating one sample gives what the whole run gives."""
        samples = self.samples if samples is None else list(samples)
        needed = self._needed(samples, names)
        gen = self.generator
        for template, wanted in sorted(needed.items()):
            todo = [s for s in wanted.values() if (template, s.sample_id) not in self.generated]
            if not todo:
                continue
            texts = ensure(self.store, None, None, model_id=gen.model_id, template_name=template,
                           documents=[s.passage for s in todo], settings=self.generation_settings, progress=progress,
                           load=lambda: gen.load()[:2], provenance={"generator": gen.cfg.get("name")})
            self.generated.update({(template, s.sample_id): t for s, t in zip(todo, texts)})
        per_document.generate(self, samples, self.specs if names is None else names, progress=progress)
        if not gen.is_scored_model:
            gen.release()  # scoring does not need the generator's weights
        return {(t, sid): self.generated[(t, sid)] for t, wanted in needed.items() for sid in wanted}

    def generation_cost(self, template: str, sample_id: str) -> dict:
        """What generating ``sample_id``'s surrogate cost, from its store entry: ``prompt_tokens``,
        ``generated_tokens``, ``seconds`` (None when unknown: an entry written before costs were recorded, or a
        text not in the store) and ``generator`` (model id). ``template`` is a template name (this document's
        surrogate) or a condition's source: ``generated:<t>`` the same, ``generated_other:<t>`` the donor's."""
        kind, _, name = template.rpartition(":")
        sample = self.sample(sample_id)
        if kind == "generated_other":
            sample = self.donor(sample)
        key = self.store.key(model_id=self.generator.model_id, template_name=name,
                             template_text=GENERATION_TEMPLATES[name], settings=self.generation_settings,
                             document=sample.passage)
        entry = self.store.entry(key)
        out = cost(entry["meta"] if entry else {})
        out["generator"] = out["generator"] or self.generator.model_id
        return out

    def surrogates(self, sample, names: Iterable[str] | None = None) -> dict:
        """Condition -> surrogate text (None: no surrogate) for ``sample``, resolved once."""
        names = list(self.specs if names is None else names)
        known = self._texts.setdefault(sample.sample_id, {})
        missing = [n for n in names if n not in known]
        if missing:
            self.generate([sample], missing)
            for n in missing:
                known[n] = self._resolve(sample, n)
        return {n: known[n] for n in names}

    def _resolve(self, sample, name: str) -> str | None:
        """The condition's surrogate text for ``sample``; a generated one must be in ``generated`` already."""
        spec = self.specs[name]
        # The tokenizer only for random tokens (it loads without weights): other sources need none.
        tok = self.tokenizer if spec.surrogate == "random_tokens" else None
        donors = ({sample.sample_id: self.donor(sample).sample_id}
                  if spec.surrogate.startswith("generated_other:") else None)
        return sources.resolve(spec.surrogate, sample, pool=self.pool, seed=self.seed, tokenizer=tok,
                               n_tokens=spec.random_tokens, generated=self.generated, donors=donors,
                               selection=self.loaded.samples, state=self.source_state(spec.surrogate),
                               exclude=(self._passage_queries.get(passage_id(sample), ())
                                        if self._passage_queries else ()))

    def _generator_id_without_weights(self) -> str | None:
        """The generator's store identity when its files give it (a packaged, local or hub model); None for an
        in-process random model, whose identity is a digest of weights that exist only once it is built."""
        info = loading.weights_identity(self.generator.cfg)
        return None if info is None else model_id(self.generator.cfg, info)

    def read_stored(self, samples: Sequence) -> None:
        """Fill ``generated`` (and ``passage_generated``) with what the store already holds for ``samples``,
        never generating: the texts ``generate`` would read from it, so nothing it later generates differs."""
        gen_id = self._generator_id_without_weights() if self.templates() else None
        if gen_id is None:
            return

        def stored(template: str, document: str) -> str | None:
            return self.store.get(self.store.key(model_id=gen_id, template_name=template,
                                                 template_text=GENERATION_TEMPLATES[template],
                                                 settings=self.generation_settings, document=document))

        for template, wanted in self._needed(samples, None).items():
            for sid, s in wanted.items():
                if (template, sid) not in self.generated and (text := stored(template, s.passage)) is not None:
                    self.generated[(template, sid)] = text
        for spec in self.specs.values():
            template = sources.generated_template(spec.surrogate)
            for s in samples:
                if not per_document.applies(spec, s):
                    continue
                for p in s.passages:
                    if (template, p) not in self.passage_generated and (text := stored(template, p)) is not None:
                        self.passage_generated[(template, p)] = text

    def _known_without_model(self, spec, sample) -> bool:
        template = sources.generated_template(spec.surrogate)
        if template is None:
            return True
        owner = self.donor(sample) if spec.surrogate.startswith("generated_other:") else sample
        passages = sample.passages if per_document.applies(spec, sample) else ()
        return (template, owner.sample_id) in self.generated and \
            all((template, p) in self.passage_generated for p in passages)

    def known_segments(self, sample) -> dict:
        """Condition -> the sample's token spans, for every condition whose surrogate text is known without a
        model: all but a generated one the store lacks (``read_stored`` first). Tokenized by ``checks_engine``,
        as the loaded engine tokenizes them."""
        out = {}
        for name, spec in self.specs.items():
            if not self._known_without_model(spec, sample):
                continue
            text = self._resolve(sample, name)
            own = per_document.texts(self, spec, sample)
            out[name] = self.checks_engine.segments(spec, document=sample.passage, query=sample.query,
                                                    answer=sample.answer, surrogate=own or text,
                                                    documents=sample.documents)
        return out

    def resolved(self, samples: Sequence | None = None) -> dict:
        """sample_id -> {condition: surrogate text} for the samples (default this shard's)."""
        return {s.sample_id: self.surrogates(s) for s in (self.samples if samples is None else samples)}

    def similarities(self, samples: Sequence | None = None) -> dict:
        """sample_id -> {condition: cos(surrogate, query)} for every condition that has a surrogate."""
        pairs, keys = [], []
        for s in self.samples if samples is None else samples:
            for name, text in self.surrogates(s).items():
                if text is not None:
                    pairs.append((text, s.query))
                    keys.append((s.sample_id, name))
        out: dict = {}
        for (sid, name), value in zip(keys, Embedder().cosine_pairs(pairs)):
            out.setdefault(sid, {})[name] = value
        return out

    # ------------------------------------------------------------ segments

    def segments(self, sample, names: Iterable[str] | None = None) -> dict:
        """Condition -> the sample's token spans (sink, prefix, its document(s), suffix; prompt, answer)."""
        names = list(self.specs if names is None else names)
        texts = self.surrogates(sample, names)
        own = {n: per_document.texts(self, self.specs[n], sample) for n in names}  # one per passage, or None
        return {n: self.engine.segments(self.specs[n], document=sample.passage, query=sample.query,
                                        answer=sample.answer, surrogate=own[n] or texts[n],
                                        documents=sample.documents)
                for n in names}


def fill_surrogate_store(cfg) -> dict[str, int]:
    """``kvprime surrogates generate``: the generation step of a run, alone. Returns template -> count."""
    session = Session.open(cfg)
    counts: dict[str, int] = {}
    for template, _ in session.generate(progress=session.cfg["progress"]):
        counts[template] = counts.get(template, 0) + 1
    return counts
