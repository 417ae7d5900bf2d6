"""One run plan turned into what every command works from, made one way and each piece once.

``run``, ``inspect``, ``walkthrough``, ``bench`` and ``surrogates generate`` all start here, so they cannot
disagree about a sample: the plan (``kvprime.pipeline.plan.prepare``: the checked settings, the conditions, this
shard's samples, the random-query pool, the surrogate sources' state), the tokenizer and the model's config (read
without weights, for the checks before the model loads), the model (loaded on first use, with that tokenizer), the
Engine, and each sample's token segments per condition. Surrogate texts, their generation, the store and their
costs are the ``SurrogateService``'s (``kvprime.surrogates.service``); the session asks it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

from ..builders.engine import Engine
from ..config.compose import compose
from ..data import load_samples
from ..errors import ConfigError
from ..models import loading
from ..models.embedder import Embedder
from ..surrogates.generator import model_id
from ..surrogates.service import SurrogateService
from .plan import RunPlan, prepare


def engine_settings(cfg: Mapping) -> dict:
    """The keywords a run's engine is made with (the bench makes its engines with the same)."""
    return {"sink": cfg["model"]["sink"], "max_context": cfg["model"].get("max_context"),
            "extend_prefixes": (cfg.get("batch") or {}).get("extend_prefixes", False)}


class Session:
    """Everything a command needs for one run plan. Build it with ``Session.open(cfg)`` or
    ``Session.from_overrides([...])``; the run builds it from the plan it made before claiming its directory.
    Nothing heavy happens until it is asked for: the model loads on first use of ``model``, ``engine`` or a
    surrogate that needs it (``tokenizer`` and ``checks_engine`` need no weights)."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.surrogate_service = SurrogateService(
            plan.conditions, plan.selection.samples, pool=plan.pool, seed=plan.seed, grouped=plan.grouped,
            prepared=plan.surrogate_sources, run_cfg=plan.cfg, tokenizer=lambda: self.tokenizer,
            scored_model=lambda: self._model)
        self._everything: list | None = None  # every usable sample of the dataset, loaded only for sample= outside it

    @classmethod
    def open(cls, cfg, only: str | None = None) -> Session:
        """``cfg`` (composed, OmegaConf or plain) checked as a run checks it, before anything loads."""
        return cls(prepare(cfg, only))

    @classmethod
    def from_overrides(cls, overrides: Sequence[str], defaults: Sequence[str] = (),
                       only: str | None = None) -> Session:
        """Compose ``conf/`` with ``overrides`` (after a command's ``defaults``, which they replace)."""
        return cls.open(compose(overrides, defaults), only)

    # The plan's parts most commands read.
    @property
    def cfg(self) -> dict:
        return self.plan.cfg

    @property
    def specs(self) -> Mapping:
        return self.plan.conditions

    @property
    def samples(self) -> tuple:
        return self.plan.samples

    @property
    def pool(self) -> tuple[str, ...]:
        return self.plan.pool

    @property
    def seed(self) -> int:
        return self.plan.seed

    # ------------------------------------------------------------ samples

    def sample(self, sample_id: str | None = None):
        """This shard's first sample, or the one named: any usable sample of the dataset can be looked at,
        even outside the selection (its random query still comes from the selection's pool)."""
        if sample_id is None:
            return self.samples[0]
        for s in [*self.samples, *self.plan.selection.samples]:
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

    @cached_property
    def engine(self) -> Engine:
        return Engine(self.model, self.tokenizer, **engine_settings(self.cfg))

    @cached_property
    def checks_engine(self) -> Engine:
        """An engine without weights (``segments`` and ``fits`` only): the context and sliding windows come from
        the model's config, so the length checks run before the model loads and agree with the loaded engine's."""
        return Engine(None, self.tokenizer, sink=self.cfg["model"]["sink"],
                      max_context=self.cfg["model"].get("max_context"), config=self._tokenizer_and_config[1])

    # ------------------------------------------------------------ surrogates (the service's)

    def surrogates(self, sample, names: Iterable[str] | None = None) -> dict:
        """Condition -> surrogate text (None: no surrogate) for ``sample``, resolved once."""
        return self.surrogate_service.texts(sample, names)

    def generate(self, samples: Sequence | None = None, names: Iterable[str] | None = None, *,
                 progress: bool = False) -> dict:
        """(template, sample_id) -> generated text the conditions (default all) need for the samples (default this
        shard's; a donor-taking condition needs its donors' too), from the store or generated."""
        return self.surrogate_service.generate(self.samples if samples is None else samples, names,
                                               progress=progress)

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
        for (sid, name), value in zip(keys, Embedder().cosine_pairs(pairs), strict=True):
            out.setdefault(sid, {})[name] = value
        return out

    # ------------------------------------------------------------ segments

    def segments(self, sample, names: Iterable[str] | None = None) -> dict:
        """Condition -> the sample's token spans (sink, prefix, its document(s), suffix; prompt, answer)."""
        names = list(self.specs if names is None else names)
        texts = self.surrogates(sample, names)
        return {n: self._segments(self.engine, self.specs[n], sample, texts[n]) for n in names}

    def known_segments(self, sample) -> dict:
        """Condition -> the sample's token spans, for every condition whose surrogate text is known without a
        model: all but a generated one the store lacks (``surrogate_service.read_stored`` first). Tokenized by
        ``checks_engine``, as the loaded engine tokenizes them."""
        service = self.surrogate_service
        return {name: self._segments(self.checks_engine, spec, sample, service.resolve(sample, name))
                for name, spec in self.specs.items() if service.known(spec, sample)}

    def _segments(self, engine: Engine, spec, sample, text: str | None):
        """One condition's spans: one surrogate per passage where the condition primes each, else ``text``."""
        own = self.surrogate_service.per_document_texts(spec, sample)
        return engine.segments(spec, document=sample.passage, query=sample.query, answer=sample.answer,
                               surrogate=own or text, documents=sample.documents)


def fill_surrogate_store(cfg) -> dict[str, int]:
    """``kvprime surrogates generate``: the generation step of a run, alone. Returns template -> count."""
    session = Session.open(cfg)
    counts: dict[str, int] = {}
    for template, _ in session.generate(progress=session.cfg["progress"]):
        counts[template] = counts.get(template, 0) + 1
    return counts
