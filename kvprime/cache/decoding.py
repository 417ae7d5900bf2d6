"""Where a model's decoding stops: the token ids that end a generated answer or surrogate.

Shared by greedy answer decoding (``kvprime.cache.answers``) and surrogate generation
(``kvprime.surrogates.generation``), so both stop at the same end-of-sequence and end-of-turn tokens.
"""

from __future__ import annotations

# End-of-turn markers of common chat templates; a row stops at whichever of these the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end a generation: the tokenizer's and the model's EOS and any end-of-turn marker it has."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids
