"""kvprime declares its annotations to type checkers (PEP 561): ``kvprime/py.typed`` exists and is package data."""

from __future__ import annotations

import re
from pathlib import Path

import kvprime

REPO = Path(kvprime.__file__).resolve().parents[1]


def test_py_typed_ships_with_the_package():
    assert (REPO / "kvprime" / "py.typed").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^kvprime = \[[^\]]*"py\.typed"', package_data, re.M)
