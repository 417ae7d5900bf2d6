"""A plugin that is a package (a folder with __init__.py) is found where plugin modules are: beside the
--config-dir folders and in the current directory, by its name or the dotted name of a module inside it, with its
relative imports working; and a later `kvprime report` imports it again from where the run found it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fixtures import cli

from kvprime.config import plugins
from kvprime.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "docs" / "extending.md"  # the Extending page
NOTE = "masked_prefix, imported from a package through a relative import."


def _readme_example(name: str) -> str:
    found = dict(re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", README.read_text(), flags=re.S))
    return found[name]


def _write_package(folder: Path, name: str = "mypkg") -> Path:
    """The README's masked_prefix builder as a package: __init__ imports the builder module, which takes its
    note from a sibling module, both relatively."""
    builder = _readme_example("my_study/masked_prefix.py")
    original = 'return "masked_prefix keeps the surrogate\'s entries in the cache, masked: only the document saw them."'
    assert original in builder
    pkg = folder / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import builders  # registers the builder\n")
    (pkg / "builders.py").write_text("from .wording import NOTE\n" + builder.replace(original, "return NOTE"))
    (pkg / "wording.py").write_text(f"NOTE = {NOTE!r}\n")
    return pkg


def _write_condition(config_dir: Path) -> None:
    (config_dir / "condition").mkdir(parents=True)
    (config_dir / "condition" / "masked_surrogate.yaml").write_text(
        _readme_example("my_study/condition/masked_surrogate.yaml"))


def _kvprime(tmp_path: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`kvprime ...` as the console script runs it: the current directory is not on sys.path (``python -m``
    would put it there and find a package in it without kvprime's help; ``fixtures.cli`` keeps it off)."""
    env = {**os.environ, "KVPRIME_OUTPUT_ROOT": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1"}
    return cli.run(args, env=env, cwd=cwd, timeout=600)


@pytest.mark.integration
@pytest.mark.parametrize("where, entry", [("config_dir", "mypkg"), ("cwd", "mypkg.builders")])
def test_a_package_plugin_runs_and_reports_from_elsewhere(tmp_path, where, entry):
    """`kvprime run --config-dir my_study plugins=[mypkg]` with the package in my_study (or in the current
    directory, named by a module inside it), on the tiny model and a tiny JSONL; then `kvprime report` from
    another directory imports the package again from where the run found it."""
    study, cwd = tmp_path / "my_study", tmp_path / "work"
    cwd.mkdir()
    _write_condition(study)
    _write_package(study if where == "config_dir" else cwd)
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "passage": f"The river passes mill {i} and reaches the sea.",
                                        "query": f"What does the river pass ({i})?", "answer": f"mill {i}"}) + "\n"
                            for i in range(2)))
    run_dir = tmp_path / "run"
    proc = _kvprime(tmp_path, ["run", "--config-dir", str(study), f"plugins=[{entry}]", "condition=masked_surrogate",
                               "model=tiny_random_llama", "model.sink=none", "dataset=jsonl", f"dataset.path={data}",
                               "stats.n_boot=1000", "progress=false", f"hydra.run.dir={run_dir}"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert list(pd.read_csv(run_dir / "summary.csv").condition) == ["bare", "masked_surrogate"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert NOTE in plan["builder_notes"]  # the relative import ran
    pkg = (study if where == "config_dir" else cwd).resolve() / "mypkg"
    assert plan["plugins"] == {entry: str(pkg / ("__init__.py" if entry == "mypkg" else "builders.py"))}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    summary = (run_dir / "summary.csv").read_bytes()
    (run_dir / "report.md").unlink()
    proc = _kvprime(tmp_path, ["report", str(run_dir)], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "summary.csv").read_bytes() == summary
    assert NOTE in (run_dir / "report.md").read_text()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The test's packages forgotten afterwards (a load's search directories are its argument: nothing else to
    reset)."""
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("kvp_pkg_"):
            del sys.modules[name]


def _package(folder: Path, name: str, **files: str) -> Path:
    pkg = folder / name
    pkg.mkdir(parents=True)
    for rel, body in {"__init__": "", **files}.items():
        (pkg / f"{rel}.py").write_text(body)
    return pkg


def test_dotted_names_and_relative_imports_in_a_search_dir(fresh, tmp_path):
    study = tmp_path / "study"
    _package(study, "kvp_pkg_a", __init__="from .core import VALUE\n", core="from .deep import X\nVALUE = X + 1\n",
             deep="X = 41\n", user="import kvp_pkg_a.core as c\nfrom . import core\nSAME = c is core\n")
    assert plugins.load_one("kvp_pkg_a", [study]).VALUE == 42
    user = plugins.load_one("kvp_pkg_a.user", [study])
    assert user.SAME and user.__name__ == "kvp_pkg_a.user"  # a real package: absolute and relative imports agree
    assert "study" not in " ".join(sys.path)  # the user's folder was not put on sys.path


def test_a_package_missing_a_module_or_failing_is_one_paragraph(fresh, tmp_path):
    pkg = _package(tmp_path, "kvp_pkg_b", __init__="raise RuntimeError('half written')\n")
    with pytest.raises(ConfigError, match=r"'kvp_pkg_b' \(package .*kvp_pkg_b\) failed while importing: "
                                          r"RuntimeError: half written"):
        plugins.load_one("kvp_pkg_b")
    (pkg / "__init__.py").write_text("")  # fixed: imported again, not the failed half
    assert plugins.load_one("kvp_pkg_b").__file__ == str(pkg / "__init__.py")
    with pytest.raises(ConfigError, match=r"no module named 'kvp_pkg_b.nope' in the package .*kvp_pkg_b"):
        plugins.load_one("kvp_pkg_b.nope")
    (tmp_path / "kvp_pkg_c").mkdir()  # a folder without __init__.py is not a package plugin
    with pytest.raises(ConfigError, match=r"no module named 'kvp_pkg_c'.*package folder kvp_pkg_c/ with __init__"):
        plugins.load_one("kvp_pkg_c")


def test_a_later_process_imports_a_package_from_its_recorded_origin(fresh, tmp_path, monkeypatch):
    study = tmp_path / "study"
    _package(study, "kvp_pkg_d", __init__="from . import mod\n", mod="from . import helper\nWHO = helper.WHO\n",
             helper="WHO = 'from the study'\n")
    loaded = plugins.load_modules(["kvp_pkg_d.mod"], dirs=[study])
    recorded = json.loads(json.dumps(plugins.origins(loaded)))  # as plan.json keeps it
    assert recorded == {"kvp_pkg_d.mod": str(study.resolve() / "kvp_pkg_d" / "mod.py")}

    # A new process: nothing imported, no --config-dir, another current directory.
    for name in [n for n in sys.modules if n.startswith("kvp_pkg_")]:
        del sys.modules[name]
    monkeypatch.chdir(tmp_path / "study" / "kvp_pkg_d")
    with pytest.raises(ConfigError, match="no module named 'kvp_pkg_d.mod'"):
        plugins.load(["kvp_pkg_d.mod"])
    assert plugins.load(["kvp_pkg_d.mod"], recorded=recorded) == ["kvp_pkg_d.mod"]
    assert sys.modules["kvp_pkg_d.mod"].WHO == "from the study"
