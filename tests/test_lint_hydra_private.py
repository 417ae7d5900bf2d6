"""Hydra's private names are imported in two modules only, each saying why: ``commands/hydra_bridge.py`` (the
runner behind ``kvprime run``) and ``scaleout/hydra_sweeper.py`` (a multirun's job list for the sweep report)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

import kvprime
from kvprime.scaleout import hydra_sweeper

KVPRIME = Path(kvprime.__file__).resolve().parent


def test_only_the_two_bridge_modules_import_hydras_private_names():
    users = sorted(str(p.relative_to(KVPRIME)) for p in KVPRIME.rglob("*.py") if "hydra._internal" in p.read_text())
    assert users == ["commands/hydra_bridge.py", "scaleout/hydra_sweeper.py"]


def test_split_jobs_is_the_basic_sweepers_job_list_in_launch_order():
    parsed = OverridesParser.create().parse_overrides(["seed=1,2", "model=a,b", "n=3"])
    assert hydra_sweeper.split_jobs(parsed) == [["seed=1", "model=a", "n=3"], ["seed=1", "model=b", "n=3"],
                                                 ["seed=2", "model=a", "n=3"], ["seed=2", "model=b", "n=3"]]


def test_split_jobs_is_none_without_a_basic_sweeper(monkeypatch):
    monkeypatch.setattr(hydra_sweeper, "BasicSweeper", None)
    assert hydra_sweeper.split_jobs(OverridesParser.create().parse_overrides(["seed=1,2"])) is None
