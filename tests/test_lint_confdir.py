"""A config file of a group must hold settings (a mapping); one that holds a list is refused naming the file."""

from __future__ import annotations

import pytest

from kvprime.config import confdir
from kvprime.errors import ConfigError


def test_a_group_config_that_is_a_list_is_refused_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "listed.yaml").write_text("- a\n- b\n")
    monkeypatch.setattr(confdir, "CONF_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"listed\.yaml holds a ListConfig, not settings"):
        confdir.load("model", "listed")


def test_a_group_config_loads_without_its_defaults_list(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("defaults:\n  - base\nname: mine\nn: ${oc.env:KVP_UNSET_X,3}\n")
    monkeypatch.setattr(confdir, "CONF_DIR", tmp_path)
    cfg = confdir.load("model", "mine")
    assert confdir.resolved(cfg) == {"name": "mine", "n": "3"}
