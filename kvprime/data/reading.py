"""Reading a data file the same way for every loader: UTF-8 with or without a byte-order mark, JSON or JSON Lines,
fields checked by name and type. Every problem is one ``DataError`` naming the file, the line (or the record's
place in the file) and the field, with what is accepted, so a bad file never surfaces as a library's traceback.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeGuard

from ..errors import DataError, MissingFileError

ACCEPTED_ENCODING = "UTF-8, with or without a byte-order mark"


def _open(path: Path):
    try:
        return path.open("rb")
    except FileNotFoundError as err:
        raise MissingFileError(f"{path}: the data file is not there.") from err
    except OSError as err:  # a folder, no permission
        raise DataError(f"{path}: the data file cannot be read ({err.strerror or err}).") from err


def _read_bytes(path: Path) -> bytes:
    with _open(path) as fh:
        return fh.read()


def _not_utf8(path: Path, line_bytes: bytes, offset: int, lineno: int) -> DataError:
    """The paragraph for an undecodable byte at ``offset`` of line ``lineno`` (``line_bytes``)."""
    column = len(line_bytes[:offset].decode("utf-8", errors="replace")) + 1
    return DataError(
        f"{path}, line {lineno}: not UTF-8: byte 0x{line_bytes[offset]:02x} at column {column}. kvprime reads data "
        f"files as {ACCEPTED_ENCODING}; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old > new` for a "
        "latin-1 file).")


def _decode_line(path: Path, raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, raw, err.start, lineno) from None


def read_text(path: Path) -> str:
    """The whole file as text (a leading byte-order mark dropped)."""
    raw = _read_bytes(path)
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line_end = raw.find(b"\n", err.start)
        line = raw[line_start:line_end if line_end >= 0 else len(raw)]
        raise _not_utf8(path, line, err.start - line_start, raw.count(b"\n", 0, err.start) + 1) from None


def json_document(path: Path, expected: str) -> object:
    """The file parsed as one JSON value. ``expected``: what the file should hold, in words, for the error."""
    text = read_text(path)
    if not text.strip():
        raise no_records(path, expected)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}). The file must "
                        f"hold {expected}.") from None


def json_lines(path: Path, expected: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line. Lines are split at newline bytes only, as JSON Lines
    defines them: a carriage return inside a value is not a line end."""
    with _open(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            text = _decode_line(path, raw, lineno)
            if not text.strip():
                continue  # a trailing newline or a blank separator is not a record
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}, column {err.colno}: not valid JSON ({err.msg}). Each line "
                                f"must hold {expected}.") from None


def opens_array(path: Path) -> bool:
    """Whether the file's first character that is not white space (after a byte-order mark) is "[": a JSON
    array of records rather than JSON Lines."""
    with _open(path) as fh:
        if fh.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            fh.seek(0)
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return chunk.strip()[:1] == b"["
    return False


def no_records(path: Path, expected: str, found: str = "the file is empty or blank") -> DataError:
    return DataError(f"{path} holds no record ({found}). It must hold {expected}.")


def kind(value) -> str:
    """A JSON value's type in JSON's words, with the value when it is short (for 'got ...')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    names = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}
    name = next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return f"{name} {shown}" if len(shown) <= 40 else name


def is_text(value) -> bool:
    return isinstance(value, str)


def is_texts(value) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_id(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def field(record: Mapping, key: str, where: str, accepted: str, ok: Callable[[object], bool], *,
          required: bool = True, needs: str = ""):
    """``record[key]`` when ``ok`` accepts it. A missing key: an error when ``required`` (``needs`` says what
    each record needs), else None. ``where``: the file and the record's place, for the error."""
    if key not in record:
        if required:
            raise DataError(f"{where}: missing field {key!r}" + (f" ({needs})." if needs else "."))
        return None
    value = record[key]
    if not ok(value):
        raise DataError(f"{where}: field {key!r} must be {accepted}, got {kind(value)}.")
    return value


def an_object(value, where: str, expected: str) -> Mapping:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected {expected}, got {kind(value)}.")
    return value
