"""Seeded draws that give the same values on every machine and Python version.

Python documents one reproducibility guarantee for ``random``: ``Random(seed).random()`` gives the same sequence
for the same seed in every version (a string seed is hashed with SHA-512). Its other methods (``randrange``,
``choice``, ``shuffle``) and numpy's ``Generator`` methods carry no such promise across versions, so every draw
here is made from ``random()`` alone. Each purpose gets its own stream (``stream``): changing one knob (a depth)
leaves the draws of the others (keys, values, filler) as they were.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class Draws:
    """One seeded stream; every method draws only through ``random()``."""

    def __init__(self, *parts: object):
        self._rng = random.Random("|".join(str(p) for p in ("kvprime", *parts)))

    def unit(self) -> float:
        """A float in [0, 1)."""
        return self._rng.random()

    def index(self, n: int) -> int:
        """An integer in [0, n)."""
        return min(int(self._rng.random() * n), n - 1)

    def pick(self, items: Sequence):
        return items[self.index(len(items))]

    def shuffled(self, items: Sequence) -> list:
        """A new list: Fisher-Yates over ``items``."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.index(i + 1)
            out[i], out[j] = out[j], out[i]
        return out

    def sample(self, items: Sequence, k: int) -> list:
        """``k`` distinct items, in draw order."""
        return self.shuffled(items)[:k]


def stream(*parts: object) -> Draws:
    """The stream named by ``parts`` (e.g. seed, task, sample index, purpose)."""
    return Draws(*parts)
