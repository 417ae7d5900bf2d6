"""One synthetic document: filler sentences with facts placed between them, and where each fact landed."""

from __future__ import annotations

from dataclasses import dataclass

from .draws import Draws
from .text import filler_sentence


@dataclass(frozen=True)
class Fact:
    """A sentence to place. ``role``: gold, hop1, hop2, needle (what the question needs), lure (a distractor that
    shares the asked key's object) or distractor. ``depth``: where to put it in [0, 1]; None: drawn."""

    text: str
    role: str
    key: str
    value: str
    depth: float | None = None


def _words(text: str) -> int:
    return len(text.split())


def _filler(words: int, draws: Draws) -> list[str]:
    """Sentences until they hold at least ``words`` words (a document ends on a whole sentence)."""
    out, n = [], 0
    while n < words:
        sentence = filler_sentence(draws)
        out.append(sentence)
        n += _words(sentence)
    return out


def _boundaries(facts: list[Fact], n_sentences: int, place: Draws) -> list[int]:
    """The sentence boundary (0 .. n_sentences) each fact goes to: its depth's nearest, or a drawn one. Every fact
    draws, depth or not, so the other facts land where they would at any other depth."""
    drawn = [place.index(n_sentences + 1) for _ in facts]
    return [round(f.depth * n_sentences) if f.depth is not None else d for f, d in zip(facts, drawn, strict=True)]


def build(facts: list[Fact], words: int, filler: Draws, place: Draws, slot: int) -> tuple[str, list[dict]]:
    """The document text (about ``words`` words, facts included) and one position record per fact, in ``facts``
    order: its slot, word and character offsets, and relative depth (0: the first sentence, 1: the last)."""
    sentences = _filler(words - sum(_words(f.text) for f in facts), filler)
    at = _boundaries(facts, len(sentences), place)
    # Facts at one boundary keep the order given; stable sort on the boundary.
    order = sorted(range(len(facts)), key=lambda i: at[i])
    pieces: list[tuple[str, int | None]] = []
    next_sentence = 0
    for i in order:
        pieces += [(s, None) for s in sentences[next_sentence:at[i]]]
        next_sentence = max(next_sentence, at[i])
        pieces.append((facts[i].text, i))
    pieces += [(s, None) for s in sentences[next_sentence:]]
    text = " ".join(p for p, _ in pieces)
    total = _words(text)
    where: dict[int, dict] = {}
    word = char = 0
    for piece, fact in pieces:
        if fact is not None:
            span = max(1, total - _words(piece))  # the positions the fact could start at, last one included
            where[fact] = {"slot": slot, "word": word, "char": char, "depth": round(word / span, 4),
                           "role": facts[fact].role, "key": facts[fact].key, "value": facts[fact].value}
        word += _words(piece)
        char += len(piece) + 1
    return text, [where[i] for i in range(len(facts))]
