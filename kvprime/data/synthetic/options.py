"""The synthetic tasks' knobs (``dataset.<key>``), each checked with one paragraph that names it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard

from ...errors import ConfigError
from .text import COLOURS, INSTRUCTIONS, VALUE_FORMATS, WORDS

SLOT_POLICIES = ("first", "middle", "last", "random", "cycle")
HOP_ORDERS = ("forward", "backward", "random")
MAX_DIGITS = 12
MAX_FACTS = 500  # distinct keys: colours x objects, less the asked keys' objects


@dataclass(frozen=True)
class Knobs:
    """Every knob of every task, checked; a task reads the ones it declares (the others keep their defaults)."""

    task: str
    seed: int
    n: int
    documents: int = 1
    words_per_document: int = 60
    facts_per_document: int = 2
    lures: int = 0
    value_format: str = "digits"
    digits: int = 4
    depth: tuple[float, ...] | None = None
    gold_slot: str | int = "random"
    hop_order: str = "random"
    instruction: str = ""

    def depth_of(self, i: int) -> float | None:
        """Sample ``i``'s requested depth of its gold fact(s): the list's i-th, cyclically; None: drawn."""
        return None if self.depth is None else self.depth[i % len(self.depth)]

    def record(self) -> dict:
        """The knobs as JSON (the ids' digest and each sample's task_info)."""
        return {"task": self.task, "seed": self.seed, "documents": self.documents,
                "words_per_document": self.words_per_document, "facts_per_document": self.facts_per_document,
                "lures": self.lures, "value_format": self.value_format, "digits": self.digits,
                "depth": list(self.depth) if self.depth is not None else None, "gold_slot": self.gold_slot,
                "hop_order": self.hop_order, "instruction": self.instruction}


def _is_int(value) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(cfg: Mapping, key: str, default: int, lo: int, hi: int | None = None, why: str = "") -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(f"dataset.{key}={value!r} is not accepted: it must be {bound}{why}.")
    return value


def _one_of(cfg: Mapping, key: str, default: str, accepted: Sequence[str]) -> str:
    value = cfg.get(key) or default
    if value not in accepted:
        raise ConfigError(f"dataset.{key}={value!r} is not accepted. Accepted: {', '.join(accepted)}.")
    return value


def _depth(cfg: Mapping) -> tuple[float, ...] | None:
    value = cfg.get("depth")
    if value is None:
        return None
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    ok = values and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values)
    if not ok:
        raise ConfigError(f"dataset.depth={value!r} is not accepted: the gold fact's relative depth in its document "
                          "must be a number from 0 (first sentence) to 1 (last), a non-empty list of such numbers "
                          "(sample i takes the i-th, cyclically: dataset.depth=[0,0.5,1]), or null (drawn per "
                          "sample).")
    return tuple(float(v) for v in values)


def _gold_slot(cfg: Mapping, documents: int) -> str | int:
    value = cfg.get("gold_slot")
    if value is None:
        return "random"
    if value in SLOT_POLICIES or (_is_int(value) and 0 <= value < documents):
        return value
    raise ConfigError(f"dataset.gold_slot={value!r} is not accepted: it must be one of {', '.join(SLOT_POLICIES)} "
                      f"(cycle: sample i's gold document at slot i mod dataset.documents) or a slot from 0 to "
                      f"{documents - 1} (dataset.documents={documents}).")


def _n(cfg: Mapping, task: str) -> int:
    n = cfg.get("n")
    if n is None:
        n = cfg.get("n_samples")
    if n is None:
        raise ConfigError(f"dataset {task!r} generates its samples, so it needs a count: set dataset.n (samples to "
                          "generate) or dataset.n_samples (they are then the same); both are null.")
    if not _is_int(n) or n < 1:
        raise ConfigError(f"dataset.n={n!r} is not accepted: the number of samples to generate must be an integer "
                          ">= 1 (or null: dataset.n_samples).")
    return n


def _instruction(cfg: Mapping, value_format: str) -> str:
    value = cfg.get("instruction")
    if value is None:
        return INSTRUCTIONS[value_format]
    if not isinstance(value, str):
        raise ConfigError(f"dataset.instruction={value!r} is not accepted: it must be a string appended to each "
                          "question (\"\" for none) or null (the value format's own).")
    return value.strip()


def _seed(cfg: Mapping) -> int:
    seed = cfg.get("seed")
    if not _is_int(seed):
        raise ConfigError(f"dataset.seed={seed!r} is not accepted: the synthetic tasks draw every key, value, filler "
                          "sentence and position from it, so it must be an integer (by default it follows seed).")
    return seed


def _fits(knobs: Knobs, gold_facts: int) -> None:
    """The sample must hold its facts with distinct keys and values."""
    total = knobs.documents * knobs.facts_per_document
    most = min(total - gold_facts, len(COLOURS) - 1)
    if knobs.lures > most:
        raise ConfigError(f"dataset.lures={knobs.lures} is not accepted: a lure is a distractor fact whose key shares "
                          f"the asked key's object in another colour, so at most {most} fit here ({total} facts in "
                          f"all, {gold_facts} of them gold; {len(COLOURS)} colours). Lower dataset.lures or raise "
                          "dataset.facts_per_document.")
    if knobs.value_format == "words" and total > len(WORDS):
        raise ConfigError(f"dataset.value_format=words has {len(WORDS)} distinct code words, but a sample holds "
                          f"{total} facts (dataset.documents x dataset.facts_per_document); lower them or use "
                          "value_format=digits.")
    if total > MAX_FACTS:
        raise ConfigError(f"a sample of {total} facts (dataset.documents x dataset.facts_per_document) is more than "
                          f"the {MAX_FACTS} distinct keys the tasks draw from; lower one of them.")
    if total < gold_facts:
        raise ConfigError(f"dataset.facts_per_document={knobs.facts_per_document} is too few for task {knobs.task}: "
                          f"its {knobs.documents} document(s) must hold its {gold_facts} gold facts.")


def parse(cfg: Mapping, task: str, defaults: Mapping, *, min_documents: int = 1, gold_facts: int = 1) -> Knobs:
    """The checked knobs of ``cfg`` (the dataset config) for ``task``. Keys the task does not declare are refused
    before this (``register_loader(options=...)``), so ``defaults`` (the task's) stand for them."""
    documents = _int(cfg, "documents", defaults.get("documents", 1), min_documents, 64,
                     f" (task {task} needs {min_documents} or more)" if min_documents > 1 else "")
    value_format = _one_of(cfg, "value_format", "digits", VALUE_FORMATS)
    knobs = Knobs(task=task, seed=_seed(cfg), n=_n(cfg, task), documents=documents,
                  words_per_document=_int(cfg, "words_per_document", defaults["words_per_document"], 0, 100_000),
                  facts_per_document=_int(cfg, "facts_per_document", defaults["facts_per_document"], 1, 50),
                  lures=_int(cfg, "lures", 0, 0), value_format=value_format,
                  digits=_int(cfg, "digits", 4, 1, MAX_DIGITS), depth=_depth(cfg),
                  gold_slot=_gold_slot(cfg, documents),
                  hop_order=_one_of(cfg, "hop_order", defaults.get("hop_order", "random"), HOP_ORDERS),
                  instruction=_instruction(cfg, value_format))
    _fits(knobs, gold_facts)
    return knobs
