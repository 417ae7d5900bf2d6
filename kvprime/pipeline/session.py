"""One composed config turned into what every command works from, made one way and each piece once.

``run``, ``inspect``, ``walkthrough``, ``bench`` and ``surrogates generate`` all start here, so they cannot
disagree about a sample: the validated settings and conditions (``kvprime.pipeline.plan.prepare``), this shard's
samples, the random-query pool (the whole selection's queries), the model and tokenizer (loaded on first use),
the Engine, every sample's surrogate text per condition (generated ones through the on-disk store) and its
token segments per condition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from ..errors import ConfigError
from ..surrogates import sources


def model_id(model_cfg: Mapping, info: Mapping) -> str:
    """What generated surrogates are keyed on: the model's name and a digest of its weights, hub revision,
    dtype and quantization (any of them changes what the model writes)."""
    weights = json.dumps([info.get("weights_sha256") or info.get("path") or "", info.get("commit"),
                          model_cfg.get("dtype"), model_cfg.get("quantization"), model_cfg.get("compute_dtype")],
                         sort_keys=True)
    return f"{model_cfg.get('name')}:{hashlib.sha256(weights.encode()).hexdigest()[:16]}"


class Session:
    """Everything a command needs for one config. Build it with ``Session.open(cfg)`` or
    ``Session.from_overrides([...])``; the run builds it from the ``prepare`` it did before claiming its
    directory. Nothing heavy happens until it is asked for: the model loads on first use of ``model``,
    ``tokenizer``, ``engine`` or a surrogate that needs them."""

    def __init__(self, prepared: Mapping):
        self.cfg: dict = prepared["cfg"]  # validated, batch sizes resolved to numbers
        self.specs: dict = prepared["specs"]  # condition name -> ConditionSpec, in run order
        self.only: str | None = prepared.get("only")
        self.loaded = prepared["loaded"]  # the whole selection (LoadResult), rejections included
        self.samples: list = prepared["samples"]  # this shard's
        # Random queries are drawn from the whole selection, so a sample's control does not depend on the
        # shard it lands in, nor on which command looks at it.
        self.pool: list[str] = prepared["pool"]
        self.load_data_s: float = prepared.get("load_data_s", 0.0)
        self.seed = int(self.cfg["seed"])
        self.generated: dict = {}  # (template, sample_id) -> text
        self._texts: dict = {}  # sample_id -> {condition: surrogate text}
        self._everything = None  # every usable sample of the dataset, loaded only for sample= outside it

    @classmethod
    def open(cls, cfg, only: str | None = None) -> Session:
        """``cfg`` (composed, OmegaConf or plain) checked as a run checks it, before anything loads."""
        from .plan import prepare

        return cls(prepare(cfg, only))

    @classmethod
    def from_overrides(cls, overrides: Sequence[str], defaults: Sequence[str] = (),
                       only: str | None = None) -> Session:
        """Compose ``conf/`` with ``overrides`` (after a command's ``defaults``, which they replace)."""
        from ..config.compose import compose

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
            from ..data import load_samples

            self._everything = load_samples({**self.cfg["dataset"], "n_samples": None}).samples
        for s in self._everything:
            if s.sample_id == sample_id:
                return s
        raise ConfigError(f"sample={sample_id!r} is not among dataset {self.cfg['dataset']['name']!r}'s usable "
                          f"samples (e.g. {', '.join(s.sample_id for s in self._everything[:3])}).")

    # ------------------------------------------------------------ model

    @cached_property
    def _model(self) -> tuple:
        from ..cache import models

        return models.load(self.cfg["model"])

    @property
    def model(self):
        return self._model[0]

    @property
    def tokenizer(self):
        return self._model[1]

    @property
    def model_info(self) -> dict:
        """What the run's metadata records about the weights (source, path, sha256, ...)."""
        return self._model[2]

    @property
    def model_id(self) -> str:
        return model_id(self.cfg["model"], self.model_info)

    def new_engine(self, cls=None):
        """A fresh engine (``cls``, default ``Engine``; the bench's naive one) over the session's model."""
        from ..cache.engine import Engine

        return (cls or Engine)(self.model, self.tokenizer, sink=self.cfg["model"]["sink"],
                               max_context=self.cfg["model"].get("max_context"))

    @cached_property
    def engine(self):
        return self.new_engine()

    # ------------------------------------------------------------ surrogates

    def templates(self, names: Iterable[str] | None = None) -> list[str]:
        """The generation templates the named conditions (default all) need, sorted."""
        specs = [self.specs[n] for n in (self.specs if names is None else names)]
        return sorted({s.surrogate.split(":", 1)[1] for s in specs if s.surrogate.startswith("generated:")})

    @cached_property
    def generation_settings(self):
        from ..surrogates.generation import GenerationSettings

        g = self.cfg["generation"]
        return GenerationSettings(**{k: g[k] for k in ("temperature", "max_new_tokens", "seed", "batch_size", "clean")
                                     if k in g})

    def generate(self, samples: Sequence | None = None, names: Iterable[str] | None = None, *,
                 progress: bool = False) -> dict:
        """(template, sample_id) -> text for the samples (default this shard's) and conditions (default all):
        read from the store, generated and stored where it has none. A document's surrogate does not depend
        on the documents generated with it, so generating one sample gives what the whole run gives."""
        samples = self.samples if samples is None else list(samples)
        templates = self.templates(names)
        for template in templates:
            todo = [s for s in samples if (template, s.sample_id) not in self.generated]
            if not todo:
                continue
            from ..surrogates.store import SurrogateStore, ensure

            store = self.cfg["generation"].get("store")
            texts = ensure(SurrogateStore(Path(store).expanduser()) if store else SurrogateStore(), self.model,
                           self.tokenizer, model_id=self.model_id, template_name=template,
                           documents=[s.passage for s in todo], settings=self.generation_settings, progress=progress)
            self.generated.update({(template, s.sample_id): t for s, t in zip(todo, texts)})
        return {(t, s.sample_id): self.generated[(t, s.sample_id)] for t in templates for s in samples}

    def surrogates(self, sample, names: Iterable[str] | None = None) -> dict:
        """Condition -> surrogate text (None: no surrogate) for ``sample``, resolved once."""
        names = list(self.specs if names is None else names)
        known = self._texts.setdefault(sample.sample_id, {})
        missing = [n for n in names if n not in known]
        if missing:
            self.generate([sample], missing)
            for n in missing:
                spec = self.specs[n]
                # The tokenizer only for random tokens: other sources need no model loaded.
                tok = self.tokenizer if spec.surrogate == "random_tokens" else None
                known[n] = sources.resolve(spec.surrogate, sample, pool=self.pool, seed=self.seed, tokenizer=tok,
                                              n_tokens=spec.random_tokens, generated=self.generated)
        return {n: known[n] for n in names}

    def resolved(self, samples: Sequence | None = None) -> dict:
        """sample_id -> {condition: surrogate text} for the samples (default this shard's)."""
        return {s.sample_id: self.surrogates(s) for s in (self.samples if samples is None else samples)}

    def similarities(self, samples: Sequence | None = None) -> dict:
        """sample_id -> {condition: cos(surrogate, query)} for every condition that has a surrogate."""
        from ..surrogates.similarity import Embedder

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
        return {n: self.engine.segments(self.specs[n], document=sample.passage, query=sample.query,
                                        answer=sample.answer, surrogate=texts[n], documents=sample.documents)
                for n in names}


def fill_surrogate_store(cfg) -> dict[str, int]:
    """``kvprime surrogates generate``: the generation step of a run, alone. Returns template -> count."""
    session = Session.open(cfg)
    counts: dict[str, int] = {}
    for template, _ in session.generate(progress=session.cfg["progress"]):
        counts[template] = counts.get(template, 0) + 1
    return counts
