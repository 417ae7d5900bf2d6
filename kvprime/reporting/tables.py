"""Markdown tables for every report kvprime writes (run, sweep, bench): one cell format, one escaping rule.

A cell that does not apply (None, NaN, pandas' NA/NaT: e.g. ``rope_fix`` of a ``full`` condition, the
baseline's own delta) is empty, never ``nan``. Floats get 4 decimals, or 3 significant digits in
scientific notation when tiny or huge; everything else is ``str()``. Every cell, header included, has
``|`` escaped and line breaks turned into ``<br>``, so text from configs or data cannot break the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

Format = str | Callable[[object], str]


def missing(value) -> bool:
    """None, NaN and pandas' missing markers: a cell that does not apply."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return value is pd.NA or value is pd.NaT


def number(value, digits: int = 4) -> str:
    """A float as the reports show it: fixed decimals, scientific below 1e-3 and from 1e5 on."""
    value = float(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def escape(text: str) -> str:
    """``|`` escaped, line breaks as ``<br>`` (a markdown table row is one line)."""
    text = str(text).strip().replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("|", "\\|").replace("\n", "<br>")


def cell(value, fmt: Format | None = None, digits: int = 4) -> str:
    """One table cell: empty when the value does not apply, ``fmt`` (a format spec or a function) when given,
    else the default number format for floats and ``str()`` for the rest; always escaped."""
    if missing(value):
        return ""
    if fmt is not None:
        text = fmt(value) if callable(fmt) else format(value, fmt)
    elif isinstance(value, (float, np.floating)):
        text = number(value, digits)
    else:
        text = str(value)
    return escape(text)


def _rows(data, columns: Sequence[str] | None) -> tuple[list[str], list[list]]:
    if isinstance(data, pd.DataFrame):
        cols = list(data.columns) if columns is None else [c for c in columns if c in data.columns]
        # Column by column, not iterrows: a row Series would turn an int column into floats in numeric rows.
        values = [data[c].tolist() for c in cols]
        return cols, [list(r) for r in zip(*values, strict=True)] if cols else [[] for _ in range(len(data))]
    rows = list(data)
    if rows and isinstance(rows[0], Mapping):
        if columns is None:
            cols = []
            for r in rows:
                cols += [k for k in r if k not in cols]
        else:
            cols = [c for c in columns if any(c in r for r in rows)]
        return cols, [[r.get(c) for c in cols] for r in rows]
    if columns is None:
        raise ValueError("markdown_table: rows given as sequences need their column names")
    return list(columns), [list(r) for r in rows]


def markdown_table(data: pd.DataFrame | Iterable[Mapping] | Iterable[Sequence], columns: Sequence[str] | None = None,
                   *, formats: Mapping[str, Format] | None = None, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table.

    ``data``: a DataFrame, a list of dicts, or a list of row sequences (then ``columns`` names them).
    ``columns``: which columns, in order; for a DataFrame or dicts, ones absent from the data are left out.
    ``formats``: per column, a format spec (``".3e"``) or a function of the value, for non-missing values.
    """
    cols, rows = _rows(data, columns)
    formats = formats or {}
    lines = ["| " + " | ".join(escape(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(cell(v, formats.get(c), digits) for c, v in zip(cols, row, strict=True)) + " |")
    return "\n".join(lines)
