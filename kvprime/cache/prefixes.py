"""Prefix extension: which planned encode continues from which other encode's cache.

Under causal attention the KV entries of a token depend only on the tokens before it and on their positions,
so when one encode's (token id, position) pairs begin with another's, the longer one can continue from the
shorter one's cache and encode only its remaining tokens (exp01: B4/D1's [sink, "Document:\\n", doc, suffix]
continues from A1's [sink, "Document:\\n", doc]). Where several encodes share an opening that is no encode of
its own (routing: "This document may be relevant to queries like:" before every surrogate line), the shared
opening becomes a scratch step, encoded once and continued by each of them.

``plan_steps`` finds both with a trie over (id, position) pairs: pure Python, no model. Positions are part of
the match because RoPE rotates every key by its position: the same ids at another offset are another cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A continuation saves the work of its past's tokens, but costs a forward pass of its own and a copy of the
# past. Sharing a handful of tokens (the 1-token sink every cache opens with) is not worth a pass: only a past
# of at least this many tokens is continued from, and a scratch opening must add at least this many tokens to
# the step it continues from.
MIN_SHARED_TOKENS = 8


@dataclass(eq=False)
class Step:
    """One encode of the plan: ``ids``/``positions`` in full; ``parent`` the step whose cache it continues
    (None: encoded from scratch); ``request`` the planned request it serves (None: a scratch opening only
    its children need); ``ready``: already memoised, nothing to run."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    parent: Step | None = None
    request: object | None = None
    ready: bool = False
    level: int = 0  # every step of a level can run once the levels before it have run
    children: list = field(default_factory=list)

    @property
    def past(self) -> int:
        return len(self.parent.ids) if self.parent is not None else 0


class _Node:
    __slots__ = ("children", "depth", "owner", "request", "ready")

    def __init__(self, depth: int, owner):
        self.children: dict = {}
        self.depth = depth
        self.owner = owner  # a request (or available entry) whose ids/positions run through this node
        self.request = None
        self.ready = False


def plan_steps(requests, available=(), min_shared: int = MIN_SHARED_TOKENS) -> list[Step]:
    """The steps that produce every request of ``requests`` (objects with ``.ids`` and ``.positions``;
    distinct), each continuing from its longest materialised proper prefix of >= ``min_shared`` tokens among
    the other requests, the ``available`` (ids, positions) pairs (memoised caches) and shared openings.
    Returned in level order; ready steps (available ones a request continues from) are included, not run."""
    root = _Node(0, None)
    entries = [(r, False) for r in requests] + [(a, True) for a in available]
    for entry, ready in entries:
        ids, positions = (entry.ids, entry.positions) if not ready else entry
        node = root
        for tok in zip(ids, positions, strict=True):
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node(node.depth + 1, (ids, positions))
            node = child
        if ready:
            node.ready = True
        else:
            node.request = entry
    steps: list[Step] = []
    # Iterative depth-first walk (encodes are thousands of tokens deep: no recursion), carrying the nearest
    # materialised ancestor step.
    stack: list[tuple[_Node, Step | None]] = [(child, None) for child in root.children.values()]
    while stack:
        node, anc = stack.pop()
        usable = anc if anc is not None and len(anc.ids) >= min_shared else None
        base = len(usable.ids) if usable is not None else 0
        branch = len(node.children) >= 2 and node.depth >= min_shared and node.depth - base >= min_shared
        if node.request is not None or node.ready or branch:
            ids, positions = node.owner
            step = Step(tuple(ids[:node.depth]), tuple(positions[:node.depth]), request=node.request,
                        ready=node.ready and node.request is None)
            if usable is not None and not step.ready:
                step.parent = usable
                usable.children.append(step)
            steps.append(step)
            anc = step
        stack.extend((child, anc) for child in node.children.values())
    steps = _prune(steps)
    _set_levels(steps)
    return sorted(steps, key=lambda s: s.level)


def _prune(steps: list[Step]) -> list[Step]:
    """Drop scratch openings that fewer than two steps continue from (their children move up to the step
    they continued from) and ready steps nobody continues from. Children come after their parents in
    ``steps``, so a reversed pass settles every child before its parent."""
    dropped = set()
    for s in reversed(steps):
        if s.request is None and not s.ready and len(s.children) < 2:
            for c in s.children:
                c.parent = s.parent
                if s.parent is not None:
                    s.parent.children.append(c)
            if s.parent is not None:
                s.parent.children.remove(s)
            dropped.add(id(s))
    return [s for s in steps if id(s) not in dropped and not (s.ready and not s.children)]


def _set_levels(steps: list[Step]) -> None:
    # Steps were appended parents first (depth-first from the root), so one pass sets every level.
    for s in steps:
        s.level = -1 if s.ready else (s.parent.level + 1 if s.parent is not None else 0)
