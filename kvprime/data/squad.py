"""SQuAD v1.1 loader: the official JSON file, one sample per question."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from kvprime.data import register_loader
from kvprime.data.types import Sample, dedupe

from ..errors import DataError, MissingFileError

SOURCE = "squad_v11"


def _resolve_path(path) -> Path:
    if path is None:
        # Lazy: the asset layer may download or locate files and is not needed for local paths.
        from kvprime.assets import fetch

        return Path(fetch("squad_v11"))
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(
            f"SQuAD v1.1 file not found: {p}. Set dataset.path to the official dev-v1.1.json "
            "(or leave it null to use the packaged copy)."
        )
    return p


@register_loader("squad_v11")
def load_squad(cfg: Mapping) -> Iterator[Sample]:
    """Yield every question of every paragraph, in file order.

    Options: `path` (a SQuAD v1.1 JSON file; null = the packaged dev set).
    The first reference answer is the one scored; the others are kept in `answers`.
    """
    path = _resolve_path(cfg.get("path"))
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        articles = doc["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a SQuAD v1.1 JSON file (expected {{'data': [...]}}): {err}") from err
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context", "")
            for qa in paragraph.get("qas", []):
                if qa.get("id") is None:
                    # Without the source id a sample cannot be matched across runs.
                    raise DataError(f"{path}: a question in article {article.get('title')!r} has no 'id'")
                texts = [a.get("text", "") for a in qa.get("answers", [])]
                # An empty answer list yields answer "", which load_samples rejects with a reason.
                yield Sample(
                    sample_id=str(qa["id"]),
                    passage=context,
                    query=qa.get("question", ""),
                    answer=texts[0] if texts else "",
                    answers=dedupe(texts),
                    source=SOURCE,
                    article=str(article.get("title") or ""),
                )
