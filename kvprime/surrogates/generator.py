"""The model that writes generated surrogates (``generation.model``), which need not be the model scored.

``generation.model: null``: the scored model writes its own surrogates. A name
(``qwen25_coder_05b_instruct``) selects ``conf/model/<name>.yaml``, read as the run's model config is, with
the run's ``model.device`` and ``model.dtype`` applied (a float32 CPU run generates in float32 on the CPU, a
bfloat16 GPU run in bfloat16 on the GPU). Why a second model: a 135M scored model mostly copies the
document's first sentence when asked for a query; a small instruction-tuned model writes real queries, and
the experiment is about priming the scored model with a good query, not about the scored model's writing.

The generator loads lazily: surrogates are keyed on its identity (``model_id``: name plus a digest of the
weight files, dtype, quantization), which for a packaged or local model is computed from the files alone,
so a rerun whose surrogates are all in the store never loads its weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

from ..config import confdir
from ..errors import ConfigError
from ..models import loading

# Model configs whose location is given on the command line (model.path / model.id): generation.model names
# a config and cannot carry that location, so these cannot be generators as they are.
_LOCATED_ON_COMMAND_LINE = {"local": "path", "hub": "id"}
# The run's settings that apply to the generator too.
RUN_SETTINGS = ("device", "dtype")


def model_id(model_cfg: Mapping, info: Mapping) -> str:
    """What generated surrogates are keyed on: the model's name and a digest of its weights, hub revision,
    dtype and quantization (any of them changes what the model writes)."""
    weights = json.dumps([info.get("weights_sha256") or info.get("path") or "", info.get("commit"),
                          model_cfg.get("dtype"), model_cfg.get("quantization"), model_cfg.get("compute_dtype")],
                         sort_keys=True)
    return f"{model_cfg.get('name')}:{hashlib.sha256(weights.encode()).hexdigest()[:16]}"


def generator_name(run_cfg: Mapping) -> str | None:
    """``generation.model`` of a run config: None when the scored model writes the surrogates."""
    return (run_cfg.get("generation") or {}).get("model") or None


def generator_model_cfg(run_cfg: Mapping) -> dict:
    """The generator's model config: the run's own model config for ``generation.model: null``, else
    ``conf/model/<name>.yaml`` with the run's device and dtype. An unknown or unusable name is one
    ConfigError paragraph; nothing is loaded or fetched here (``kvprime.pipeline.plan.prepare`` calls it)."""
    name = generator_name(run_cfg)
    if name is None:
        return dict(run_cfg["model"])
    known = confdir.names("model")
    if name not in known:
        raise ConfigError(f"generation.model={name!r} is not a model config. generation.model names the model that "
                          f"writes generated surrogates: null (the scored model) or one of the configs in conf/model: "
                          f"{', '.join(known)}. No model was loaded.")
    cfg = confdir.resolved(confdir.load("model", name))
    where = _LOCATED_ON_COMMAND_LINE.get(str(cfg.get("source")))
    if where is not None and not cfg.get(where):
        raise ConfigError(f"generation.model={name!r} names a model config whose location (model.{where}) is set on "
                          "the command line, which generation.model cannot carry. Add a config for that model to "
                          "conf/model (a copy of this one with its location filled in) and name it, or use "
                          f"generation.model=null to generate with the scored model. Accepted: {', '.join(known)}.")
    run_model = run_cfg.get("model") or {}
    cfg.update({k: run_model[k] for k in RUN_SETTINGS if run_model.get(k) is not None})
    return cfg


class Generator:
    """The generator of one session: its config, identity and HF config cheaply, its weights on first need.

    ``shared`` (a zero-argument callable returning (model, tokenizer, info)) is the scored model's loader:
    used when the generator is the scored model (``generation.model: null`` or a config equal to the run's),
    so one model is never loaded twice."""

    def __init__(self, run_cfg: Mapping, shared: Callable[[], tuple]):
        self.name = generator_name(run_cfg)
        self.cfg = generator_model_cfg(run_cfg)
        # A named config equal to the run's (every key it sets has the run's value; the run's has more, filled
        # in by the settings check) is the scored model: loaded once.
        run_model = run_cfg["model"]
        self.is_scored_model = self.name is None or all(run_model.get(k) == v for k, v in self.cfg.items())
        self._shared = shared
        self._loaded: tuple | None = None
        self._id: str | None = None
        self._config = None

    def load(self) -> tuple:
        """(model, tokenizer, info); the scored model's when they are the same."""
        if self.is_scored_model:
            return self._shared()
        if self._loaded is None:
            self._loaded = loading.load(self.cfg)
        return self._loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def release(self) -> None:
        """Drop a separate generator's weights (the scored model's stay): scoring does not need them."""
        self._loaded = None

    @property
    def model_id(self) -> str:
        if self._id is None:
            info = None if self.is_scored_model else loading.weights_identity(self.cfg)
            self._id = model_id(self.cfg, info if info is not None else self.load()[2])
        return self._id

    @property
    def config(self):
        """The generator's HF config, without loading weights where the files allow it."""
        if self._config is None:
            if self._loaded is not None:
                self._config = self._loaded[0].config
            else:
                self._config = loading.model_config(self.cfg)  # config.json (a tiny model's: built, no weights)
        return self._config

    def describe(self) -> dict:
        """What the run's metadata records about the generator."""
        return {"model": self.cfg.get("name"), "model_id": self.model_id, "scored_model": self.is_scored_model,
                "source": self.cfg.get("source"), "dtype": self.cfg.get("dtype"), "device": self.cfg.get("device")}
