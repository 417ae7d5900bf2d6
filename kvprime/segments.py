"""Token segments: every piece of text is tokenized on its own and the ids are concatenated.

Tokenizing a joined string and subtracting a separately tokenized prefix (the notebooks' way) mis-assigns a
token wherever the tokenizer merges across the boundary. Tokenizing each segment alone makes the document's
ids the same in every condition by construction.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from .errors import ConfigError

CACHE_SEGMENTS = ("sink", "prefix", "document", "suffix")
SCORE_SEGMENTS = ("prompt", "answer")

# The only fields each template may use. A prefix or suffix sees the surrogate, never the real query,
# unless the condition's surrogate source *is* the query: that keeps leaks a config decision.
TEMPLATE_FIELDS = {
    "prefix_template": {"surrogate"},
    "document_template": {"document"},
    "suffix_template": {"surrogate"},
    "prompt_template": {"query"},
    "answer_template": {"answer"},
}


def template_fields(template: str) -> set[str]:
    """Names used as ``{field}`` in a str.format template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def tokenize(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sink_ids(tokenizer, policy: str) -> list[int]:
    """The first cache entry. ``bos``: the tokenizer's BOS token, kept even when its tokenizer does not
    add it by itself (SmolLM2), because the notebooks keep BOS in every cache as the attention sink."""
    if policy == "none":
        return []
    if policy == "bos":
        if tokenizer.bos_token_id is None:
            raise ConfigError(
                "model.sink=bos, but this tokenizer defines no BOS token. Accepted: model.sink=none (no sink "
                "entry) or a tokenizer with a bos_token."
            )
        return [int(tokenizer.bos_token_id)]
    raise ConfigError(f"model.sink={policy!r} is not a sink policy. Accepted: bos, none.")


@dataclass(frozen=True)
class Segments:
    sink: tuple[int, ...]
    prefix: tuple[int, ...]
    document: tuple[int, ...]
    suffix: tuple[int, ...]
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    texts: dict = field(default_factory=dict, compare=False)

    def __len__(self) -> int:  # tokens a full encode + score needs
        return sum(len(getattr(self, name)) for name in CACHE_SEGMENTS + SCORE_SEGMENTS)


def build_segments(tokenizer, *, sink: list[int], texts: dict[str, str]) -> Segments:
    """``texts`` maps prefix/document/suffix/prompt/answer to rendered text."""
    ids = {name: tuple(tokenize(tokenizer, texts.get(name, ""))) for name in ("prefix", "document", "suffix",
                                                                              "prompt", "answer")}
    return Segments(sink=tuple(sink), texts=dict(texts), **ids)
