"""A tiny random Llama and a tiny BPE tokenizer, built in-process: no download, seconds to make.

Used for tests and dry runs. The tokenizer is a real byte-level BPE (it merges across word boundaries
like the real ones do), trained deterministically on a small built-in text, so token-boundary bugs show.
"""

from __future__ import annotations

from functools import lru_cache

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "phi": transformers.PhiConfig,
        "gemma3_text": transformers.Gemma3TextConfig,
    }
    if arch not in classes:
        raise ConfigError(f"tiny arch {arch!r} is not known. Accepted: {', '.join(classes)}.")
    if arch == "gemma3_text":
        common.update(head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    common.update(overrides)
    return classes[arch](**common)


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 512, device: str | None = None, **overrides):
    """Weights drawn on the CPU (the same on every machine), then moved to ``device``: by default
    ``$KVPRIME_TEST_DEVICE`` or cpu, so the test suite's mechanics can be rerun on a GPU unchanged."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides), dtype=torch.float32)
    return model.to(device or os.environ.get("KVPRIME_TEST_DEVICE") or "cpu").eval()
