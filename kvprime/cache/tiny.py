"""A tiny random Llama and a tiny BPE tokenizer, built in-process: no download, seconds to make.

Used for tests and dry runs. The tokenizer is a real byte-level BPE (it merges across word boundaries
like the real ones do), trained deterministically on a small built-in text, so token-boundary bugs show.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ..errors import ConfigError

_CORPUS = """\
The capital of France is Paris. It is known for the Eiffel Tower.
What is the capital of France? What is the population of Japan?
Document: This document may be relevant to queries like: how do I do this step by step?
Question: Answer: The answer is in the passage. A passage of text describes a place, a person or an event.
Super Bowl 50 was an American football game to determine the champion of the National Football League.
Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.
The river flows through the city and into the sea; its water is used for farming, drinking and power.
How much does this cost or how long does it take? What are the key facts I need to know?
What problem does this solve? What is this and what does it mean? 0 1 2 3 4 5 6 7 8 9 10 100 1000 2025
"""


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    """A 2-layer config of a RoPE architecture; ``overrides`` set any config field (rope_parameters too)."""
    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "phi": transformers.PhiConfig,
        "phi3": transformers.Phi3Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }
    if arch not in classes:
        raise ConfigError(f"tiny arch {arch!r} is not known. Accepted: {', '.join(classes)}.")
    if arch == "gemma3_text":
        common.update(head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    if arch == "phi3":  # its defaults name token 32000, outside a tiny vocabulary: use the tiny tokenizer's ids
        common.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    common.update(overrides)
    return classes[arch](**common)


# Every RoPE variant kvprime corrects, as (arch, config overrides) of a tiny model. Gemma3's window is widened
# here so that a probe of a few hundred tiny-BPE tokens fits it (its layers still use their own frequencies).
ROPE_VARIANTS = {
    "default": ("llama", {}),
    "linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64}}),
    # original_max_position_embeddings * factor = max_position_embeddings, as yarn expects.
    "yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 512}}),
    "partial_rotary_phi": ("phi", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.5}}),
    "partial_rotary_phi3": ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.75}}),
    "gemma3_per_layer": ("gemma3_text", {"sliding_window": 512}),
}


def position_sensitive(model, attention: float = 16.0, mixing: float = 8.0, logits: float = 10.0):
    """Scale a random model's weights so that its answer NLL depends on where the keys are.

    At the default initialisation attention is nearly uniform and the logits nearly flat, so moving every key
    by S positions changes a tiny model's NLL by 1e-4 nats or less: too little to tell a wrong re-rotation
    from round-off. Sharper attention (query/key weights, or Gemma3's q/k norms), stronger attention outputs
    and larger logits make a misplaced key cost tenths of a nat, while the model stays well-conditioned."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    v_rows = config.num_key_value_heads * head_dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(attention)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(attention - 1)  # Gemma3's RMSNorm scales by (1 + weight)
            elif name.endswith(("v_proj.weight", "o_proj.weight", "self_attn.dense.weight")):
                p.mul_(mixing)
            elif name.endswith("qkv_proj.weight"):  # Phi3's fused projection, rows [q | k | v]
                p[:-v_rows].mul_(attention)
                p[-v_rows:].mul_(mixing)
            elif name.endswith(("lm_head.weight", "embed_tokens.weight")):
                p.mul_(logits)
    return model


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 512, device: str | None = None, **overrides):
    """Weights drawn on the CPU (the same on every machine), then moved to ``device``: by default
    ``$KVPRIME_TEST_DEVICE`` or cpu, so the test suite's mechanics can be rerun on a GPU unchanged."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides), dtype=torch.float32)
    return model.to(device or os.environ.get("KVPRIME_TEST_DEVICE") or "cpu").eval()
