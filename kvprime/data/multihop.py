"""Loaders for the field's multi-hop QA formats, from local files or a Hugging Face ``datasets`` hub copy:
HotpotQA (distractor setting), 2WikiMultihopQA and MuSiQue.

Each record becomes one sample whose documents are its own paragraphs ("<title>\\n<text>"), in the source's
order or shuffled by a seeded rule (``dataset.order=shuffled``: a permutation drawn from dataset.seed and the
sample id alone); the supporting paragraphs are its gold passages (``Sample.gold_slots``, in the source's
evidence order; ``gold_slot`` and ``passage`` are the first of them), every reference answer is kept, and
``task_info`` records the paragraphs' source indices and the source's own labels (question type, level,
evidence triples, hop order). Run them with ``multidoc.k=1``: the context is the record's own.

The formats, as their documentation gives them:

- HotpotQA, README of github.com/hotpotqa/hotpot ("JSON Format"): the file is a JSON list of objects with
  ``_id``, ``question``, ``answer``, ``supporting_facts`` (a list of ``[title, sent_id]``, sent_id 0-based) and
  ``context`` (a list of ``[title, sentences]``, sentences a list of strings); ``type`` (comparison, bridge) and
  ``level`` besides. The test set has no answer or supporting facts, so it cannot be scored (refused by field).
- 2WikiMultihopQA, README of github.com/Alab-NII/2wikimultihop ("Dataset Contents"): "follows the format of
  HotpotQA", plus ``evidences`` (``[subject, relation, object]`` triples), ``type`` and ``entity_ids``.
- MuSiQue, github.com/StonyBrookNLP/musique (its ``evaluate_v1.0.py`` reads the data files, JSON Lines such as
  ``musique_ans_v1.0_dev.jsonl``): ``id``, ``question``, ``answer``, ``answer_aliases`` (the further references),
  ``answerable`` (false for MuSiQue-Full's unanswerable contrast records, rejected here with that reason) and
  ``paragraphs`` (objects with ``idx``, ``title``, ``paragraph_text``, ``is_supporting``);
  ``question_decomposition`` (one object per hop with ``paragraph_support_idx``) gives the hop order.
- The hub's ``hotpot_qa`` (config ``distractor``) stores the same record column-wise: ``id`` for ``_id``,
  ``context`` as ``{"title": [...], "sentences": [[...]]}`` and ``supporting_facts`` as ``{"title": [...],
  "sent_id": [...]}`` (its dataset card, e.g. in tensorflow/datasets' community catalogue); both shapes are read.

A file is a JSON array of records or JSON Lines (one record a line), UTF-8 with or without a byte-order mark
(``kvprime.data.reading``); every missing or malformed field is one paragraph naming the file, the record's
array index or line, and the field. HotpotQA's few supporting facts whose sent_id is past the paragraph's last
sentence still mark their paragraph gold (sent_id is kept in task_info, not checked).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from kvprime.data import register_loader
from kvprime.data.types import Rejection, Sample, dedupe

from ..errors import ConfigError, DataError, MissingFileError, UnavailableError
from . import reading
from .synthetic.draws import stream

ORDERS = ("source", "shuffled")
# The options every file loader here declares: a local file, or a hub copy, and the paragraphs' order.
SOURCE_OPTIONS = ("path", "hf_dataset", "hf_config", "split", "cache_dir", "order")

HOTPOT_RECORD = ('a HotpotQA-format record: a JSON object with "_id", "question", "answer", "context" ([[title, '
                 '[sentences]], ...]) and "supporting_facts" ([[title, sent_id], ...])')
MUSIQUE_RECORD = ('a MuSiQue record: a JSON object with "id", "question", "answer", "paragraphs" ([{"idx", "title", '
                  '"paragraph_text", "is_supporting"}, ...]) and optionally "answer_aliases", "answerable", '
                  '"question_decomposition"')


# ------------------------------------------------------------ where the records come from


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_rows(cfg: Mapping, loader: str) -> Iterator[tuple[str, Mapping]]:
    # Imported here: `datasets` is slow to import and only the hub path needs it.
    import datasets

    hub_id, config, split = cfg["hf_dataset"], cfg.get("hf_config"), cfg.get("split") or "validation"
    named = f"dataset.hf_dataset={hub_id}" + (f" (hf_config={config}" if config else " (no hf_config") + \
        f", split={split})"
    try:
        rows = datasets.load_dataset(hub_id, config, split=split, cache_dir=cfg.get("cache_dir"))
    except Exception as err:  # noqa: BLE001 - any hub or cache failure has the same two remedies
        state = ("HF_HUB_OFFLINE is set, so the hub is not asked and the datasets cache holds no copy" if _offline()
                 else "the hub could not be reached or refused it, and the datasets cache holds no copy")
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise UnavailableError(
            f"{named} could not be loaded for dataset.name={loader}: {state} ({type(err).__name__}: {reason}). "
            f"Set dataset.path=/path/to/a local file in the source's own format instead (and hf_dataset=null), "
            f"or run where the hub is reachable (HF_HUB_OFFLINE unset) with the dataset's id, config and split "
            f"right.") from None
    for i, row in enumerate(rows):
        yield f"{hub_id} ({config or 'default'}, {split}), row {i}", dict(row)


def _file_rows(path: Path, expected: str) -> Iterator[tuple[str, object]]:
    """(where, record) for a JSON array of records or for JSON Lines."""
    if reading.opens_array(path):
        doc = reading.json_document(path, f"a JSON array of records, each {expected}")
        assert isinstance(doc, list)  # opens_array: the file's value begins with [
        for i, item in enumerate(doc):
            yield f"{path}, [{i}]", item
        return
    for lineno, item in reading.json_lines(path, expected):
        yield f"{path}, line {lineno}", item


def records(cfg: Mapping, loader: str, expected: str) -> Iterator[tuple[str, object]]:
    """(where, record) from ``dataset.path`` or ``dataset.hf_dataset`` (exactly one of them)."""
    path, hub = cfg.get("path"), cfg.get("hf_dataset")
    if path not in (None, "???") and hub is not None:
        raise ConfigError(f"dataset.path={path} and dataset.hf_dataset={hub} are both set for dataset.name={loader}; "
                          "set one: a local file, or a hub copy (then dataset.path=null).")
    if hub is not None:
        yield from _hub_rows(cfg, loader)
        return
    if path in (None, "???"):
        raise ConfigError(f"dataset.name={loader} reads a local file or a hub copy, and neither is set: set "
                          f"dataset.path=/path/to/file (a JSON array or JSON Lines of records, each {expected}) or "
                          "dataset.hf_dataset=<hub id> (with hf_config and split).")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"{p} (from dataset.path) is not a file; dataset.name={loader} needs a JSON array or "
                               f"JSON Lines of records, each {expected}.")
    n = 0
    for pair in _file_rows(p, expected):
        n += 1
        yield pair
    if n == 0:
        raise reading.no_records(p, f"a JSON array or JSON Lines of records, each {expected}")


# ------------------------------------------------------------ fields


def _is_pair_list(value, second) -> bool:
    return isinstance(value, list) and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                           and second(v[1]) for v in value)


def _columns(value, keys: tuple[str, str]) -> list | None:
    """The hub's column-wise ``{keys[0]: [...], keys[1]: [...]}`` as pairs; None if ``value`` is not that."""
    if not (isinstance(value, dict) and set(keys) <= set(value)):
        return None
    first, second = value[keys[0]], value[keys[1]]
    if not (isinstance(first, list) and isinstance(second, list) and len(first) == len(second)):
        return None
    return [[a, b] for a, b in zip(first, second, strict=True)]


def _pairs(record: Mapping, key: str, where: str, columns: tuple[str, str], accepted: str, second) -> list:
    """A list of [title, x] pairs, as in the file or column-wise as on the hub."""
    value = reading.field(record, key, where, accepted, lambda v: True,
                          needs="each HotpotQA-format record has context and supporting_facts")
    pairs = _columns(value, columns)
    pairs = value if pairs is None else pairs
    if not _is_pair_list(pairs, second):
        raise DataError(f"{where}: field {key!r} must be {accepted}, got {reading.kind(value)}.")
    return pairs


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record_id(record: Mapping, where: str, keys: tuple[str, ...]) -> str:
    """The first of ``keys`` the record has (the hub renames ``_id`` to ``id``)."""
    key = next((k for k in keys if k in record), keys[0])
    return str(reading.field(record, key, where, "a string or an integer", reading.is_id,
                             needs="each record has an id, which keys its scores"))


def _text(record: Mapping, key: str, where: str, needs: str) -> str:
    return reading.field(record, key, where, "a string", reading.is_text, needs=needs)


# ------------------------------------------------------------ one sample


def check_order(cfg: Mapping, loader: str) -> str:
    order = cfg.get("order") or "source"
    if order not in ORDERS:
        raise ConfigError(f"dataset.order={order!r} is not accepted for dataset.name={loader}. Accepted: source (the "
                          "record's own paragraph order), shuffled (a permutation drawn from dataset.seed and the "
                          "sample id).")
    if order == "shuffled" and not _is_index(cfg.get("seed")):
        raise ConfigError(f"dataset.order=shuffled draws each sample's paragraph order from dataset.seed, which must "
                          f"then be an integer; got {cfg.get('seed')!r}.")
    return order


def arrange(cfg: Mapping, loader: str, sample_id: str, n: int) -> list[int]:
    """The source indices of the documents in context order (``dataset.order``)."""
    if check_order(cfg, loader) == "source":
        return list(range(n))
    return stream(cfg["seed"], loader, sample_id, "order").shuffled(range(n))


def multi_gold(*, sample_id: str, loader: str, cfg: Mapping, documents: list[str], gold: list[int], question: str,
               answers: Sequence[str], where: str, info: Mapping) -> Sample | Rejection:
    """A sample of ``documents`` (source order) with the gold ones (source indices, evidence order), arranged as
    ``dataset.order`` says."""
    if not gold:
        return Rejection(sample_id, "no supporting paragraph: the record names no gold passage to score against")
    distinct = dedupe(a for a in answers if a.strip())
    if not distinct:
        return Rejection(sample_id, "no reference answer (empty answer)")
    order = arrange(cfg, loader, sample_id, len(documents))
    slot_of = {source: slot for slot, source in enumerate(order)}
    slots = tuple(slot_of[g] for g in gold)
    return Sample(sample_id=sample_id, passage=documents[gold[0]], query=question, answer=distinct[0],
                  answers=distinct, source=loader, passages=tuple(documents[i] for i in order), gold_slot=slots[0],
                  gold_slots=slots, task_info={**info, "source_index": order}, origin=where)


def _document(title: str, text: str) -> str:
    return f"{title}\n{text}" if title.strip() else text


def _hotpot_gold(titles: list[str], facts: list) -> tuple[list[int], str | None]:
    """The supporting paragraphs' source indices, in order of first mention; or the reason there are none."""
    gold: list[int] = []
    for title, _ in facts:
        found = [i for i, t in enumerate(titles) if t == title]
        if not found:
            return [], f"supporting fact title {title!r} is not among the context's paragraph titles"
        gold += [i for i in found if i not in gold]
    return gold, None


def hotpot_sample(record, where: str, cfg: Mapping, loader: str) -> Sample | Rejection:
    """One HotpotQA-format record (HotpotQA, 2WikiMultihopQA)."""
    reading.an_object(record, where, HOTPOT_RECORD)
    sid = _record_id(record, where, ("_id", "id"))
    needs = "each record has question and answer; a test-set file without answers cannot be scored"
    question, answer = _text(record, "question", where, needs), _text(record, "answer", where, needs)
    context = _pairs(record, "context", where, ("title", "sentences"), "a list of [title, [sentences]] pairs",
                     reading.is_texts)
    facts = _pairs(record, "supporting_facts", where, ("title", "sent_id"), "a list of [title, sent_id] pairs",
                   _is_index)
    info = {k: record[k] for k in ("type", "level", "evidences") if record.get(k) is not None}
    titles = [t for t, _ in context]
    gold, why = _hotpot_gold(titles, facts)
    if why is not None:
        return Rejection(sid, why)
    documents = [_document(t, " ".join(s.strip() for s in sentences if s.strip())) for t, sentences in context]
    info["supporting_facts"] = [[t, k] for t, k in facts]
    return multi_gold(sample_id=sid, loader=loader, cfg=cfg, documents=documents, gold=gold, question=question,
                      answers=[answer], where=where, info=info)


def _paragraph(p, where: str) -> tuple[int, str, str, bool]:
    reading.an_object(p, where, 'a paragraph object {"idx", "title", "paragraph_text", "is_supporting"}')
    needs = "each MuSiQue paragraph has idx, title, paragraph_text and is_supporting"
    idx = reading.field(p, "idx", where, "an integer", _is_index, needs=needs)
    title = reading.field(p, "title", where, "a string", reading.is_text, needs=needs)
    text = reading.field(p, "paragraph_text", where, "a string", reading.is_text, needs=needs)
    supporting = reading.field(p, "is_supporting", where, "true or false", lambda v: isinstance(v, bool), needs=needs)
    return idx, title, text, supporting


def _hop_order(record: Mapping, where: str, supporting: list[int], idx: list[int]) -> list[int]:
    """The supporting paragraphs' source indices: the decomposition's hop order first, then any other."""
    steps = reading.field(record, "question_decomposition", where, "a list of objects (one per hop)",
                          lambda v: v is None or (isinstance(v, list) and all(isinstance(s, dict) for s in v)),
                          required=False) or []
    hops = [idx.index(s["paragraph_support_idx"]) for s in steps if s.get("paragraph_support_idx") in idx]
    ordered = [i for i in dict.fromkeys(hops) if i in supporting]
    return ordered + [i for i in supporting if i not in ordered]


def musique_sample(record, where: str, cfg: Mapping, loader: str) -> Sample | Rejection:
    """One MuSiQue record."""
    reading.an_object(record, where, MUSIQUE_RECORD)
    sid = _record_id(record, where, ("id", "_id"))
    needs = "each MuSiQue record has id, question, answer and paragraphs"
    question, answer = _text(record, "question", where, needs), _text(record, "answer", where, needs)
    aliases = reading.field(record, "answer_aliases", where, "a list of strings",
                            lambda v: v is None or reading.is_texts(v), required=False) or []
    answerable = reading.field(record, "answerable", where, "true or false",
                               lambda v: v is None or isinstance(v, bool), required=False)
    paragraphs = reading.field(record, "paragraphs", where, "a list of paragraph objects",
                               lambda v: isinstance(v, list), needs=needs)
    parsed = [_paragraph(p, f"{where}, paragraphs[{j}]") for j, p in enumerate(paragraphs)]
    if answerable is False:
        return Rejection(sid, "answerable is false (a MuSiQue-Full contrast record: its context lacks a supporting "
                              "paragraph, so it has no gold answer to score)")
    idx = [p[0] for p in parsed]
    gold = _hop_order(record, where, [j for j, p in enumerate(parsed) if p[3]], idx)
    documents = [_document(title, text) for _, title, text, _ in parsed]
    return multi_gold(sample_id=sid, loader=loader, cfg=cfg, documents=documents, gold=gold, question=question,
                      answers=[answer, *aliases], where=where, info={"paragraph_idx": idx})


def _load(cfg: Mapping, loader: str, expected: str, make) -> Iterator[Sample | Rejection]:
    if cfg.get("group_by_passage"):
        raise ConfigError(f"dataset.group_by_passage=true serves one passage's cache to all of its questions, but "
                          f"{loader} gives each question its own paragraphs, so no two questions share a context. "
                          "Set dataset.group_by_passage=false.")
    check_order(cfg, loader)  # a bad order is refused before the first record is read
    for where, record in records(cfg, loader, expected):
        yield make(record, where, cfg, loader)


@register_loader("hotpotqa", options=SOURCE_OPTIONS)
def load_hotpotqa(cfg: Mapping) -> Iterator[Sample | Rejection]:
    """HotpotQA, distractor setting (module docstring): its 10 paragraphs, the supporting ones gold."""
    return _load(cfg, "hotpotqa", HOTPOT_RECORD, hotpot_sample)


@register_loader("2wikimultihopqa", options=SOURCE_OPTIONS)
def load_2wikimultihopqa(cfg: Mapping) -> Iterator[Sample | Rejection]:
    """2WikiMultihopQA (HotpotQA's format, evidence triples kept in task_info)."""
    return _load(cfg, "2wikimultihopqa", HOTPOT_RECORD, hotpot_sample)


@register_loader("musique", options=SOURCE_OPTIONS)
def load_musique(cfg: Mapping) -> Iterator[Sample | Rejection]:
    """MuSiQue (-Ans or -Full): its paragraphs, the supporting ones gold in hop order; unanswerable rejected."""
    return _load(cfg, "musique", MUSIQUE_RECORD, musique_sample)
