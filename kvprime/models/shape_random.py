"""``model.source: shape_random``: a randomly initialised model of a real architecture, for measuring cost.

The architecture comes from the YAML (``arch`` and every config value under ``config``), so no download is
needed; the tokenizer is a packaged model's (``tokenizer: <conf/model name>``), because the tiny test tokenizer
cuts English into 2.8x more tokens than a real one and the cost would be that of longer texts. Weights are drawn
directly on the device in the run's dtype (a 7B model never passes through host memory in float32). Its NLLs and
surrogates mean nothing; its FLOPs, memory and time are those of the real model on texts of real length.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..config import confdir
from ..errors import ConfigError


def config_of(cfg: Mapping):
    """The transformers config the YAML describes (no weights, no files)."""
    arch, values = cfg.get("arch"), cfg.get("config")
    if not isinstance(values, Mapping) or not values:
        raise ConfigError(f"model {cfg.get('name')!r} has source shape_random but no model.config mapping: it must "
                          "list the architecture's config values (hidden_size, num_hidden_layers, ...), as "
                          "conf/model/mistral_7b_shape_random.yaml does.")
    try:
        return AutoConfig.for_model(str(arch), **dict(values))
    except ValueError as err:
        raise ConfigError(f"model.arch={arch!r} is not a transformers model type ({err}). Accepted: a model_type "
                          "such as llama, mistral, qwen2.") from err


def tokenizer_model_cfg(cfg: Mapping) -> dict:
    """The conf/model entry whose tokenizer this model uses."""
    name, known = cfg.get("tokenizer"), confdir.names("model")
    if name not in known:
        raise ConfigError(f"model.tokenizer={name!r} is not a model config. A shape_random model borrows a packaged "
                          f"model's tokenizer; accepted: {', '.join(known)}.")
    tcfg = confdir.resolved(confdir.load("model", name))
    if tcfg.get("source") not in ("asset", "local"):
        raise ConfigError(f"model.tokenizer={name!r} is a {tcfg.get('source')!r} model; a shape_random model needs a "
                          "tokenizer on this disk (a packaged or local model), e.g. smollm2_135m_instruct.")
    return tcfg


def load(cfg: Mapping, dtype, device: str, tokenizer_folder: str, name: str | None):
    """(model, tokenizer, info); ``tokenizer_folder``: where ``tokenizer_model_cfg``'s files are (the caller,
    ``kvprime.models.loading``, resolves it). The tokenizer's ids must fit the architecture's vocabulary."""
    config = config_of(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"model.config.vocab_size={config.vocab_size} is smaller than the vocabulary of "
                          f"model.tokenizer={cfg.get('tokenizer')!r} ({len(tokenizer)} tokens): its ids would fall "
                          "outside the embedding. Raise vocab_size to at least that or pick another tokenizer.")
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    info = {"source": "shape_random", "name": name, "arch": cfg.get("arch"), "seed": seed,
            "tokenizer": cfg.get("tokenizer"), "weights": "random: cost only, NLLs meaningless"}
    return model, tokenizer, info
